"""lora-offset demo: the captioned world, the word tokenizer, the shipped base model, the leak
diagnostics, the protocol's arms and verdicts, the job runner, and `demo --quick` end to end."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_offset.config import Config
from lora_offset.errors import UserError
from lora_offset.experiments import demo, demo_base, demo_jobs, demo_report, demo_runner, demo_world, leak

ASSET = demo_base.ASSETS_DIR / demo_base.WEIGHTS_NAME


# ---------------------------------------------------------------------------------------------- the world


def test_brightness_words_bin_the_image_luminance_in_order():
    means = {}
    for word, (low, high) in demo_world.BRIGHTNESS.items():
        images, attrs = demo_world.draw_dataset(40, seed=1, brightness=word)
        lum = demo_world.mean_luminance(images)
        assert all(a.brightness == word and low <= a.level <= high for a in attrs)
        # the shape shifts the mean a little; the background's range holds it
        assert lum.min() >= low - 0.06 and lum.max() <= high + 0.06, (word, lum.min(), lum.max())
        means[word] = lum.mean()
    assert list(means.values()) == sorted(means.values())
    assert means["very dark"] < 0.12 and means["very bright"] > 0.88


def test_shapes_have_the_named_hue():
    images, attrs = demo_world.draw_dataset(60, seed=2, brightness="medium")
    for image, a in zip(images, attrs):
        x, y = (int(v * demo_world.IMAGE_SIZE) for v in a.centre)
        r, g, b = image[y, x]  # the centre of the shape
        dominant = {"red": r > max(g, b), "green": g > max(r, b), "blue": b > max(r, g),
                    "yellow": min(r, g) > b, "purple": min(r, b) > g}[a.colour]
        assert dominant, (a, image[y, x])


def test_shapes_are_small_and_inside_the_picture():
    images, attrs = demo_world.draw_dataset(200, seed=4, brightness="medium")
    level = np.array([a.level for a in attrs])[:, None, None]
    shape_area = (np.abs(images @ demo_world.REC709 - level) > 0.1).mean(axis=(1, 2))
    assert 0.02 < shape_area.min() and shape_area.max() < 0.08  # v3's centred shapes covered ~0.18
    for a in attrs:
        assert all(0.0 < v - 1.15 * a.radius and v + 1.15 * a.radius < 1.0 for v in a.centre)
    assert np.ptp([a.centre[0] for a in attrs]) > 0.3  # not always in the same place


def test_captions_drop_words_at_the_stated_rates_and_never_say_sks():
    rng = np.random.default_rng(0)
    attrs = [demo_world.draw_attributes(rng) for _ in range(2000)]
    captions = [demo_world.draw_caption(rng, a) for a in attrs]
    n = len(captions)
    empty = sum(c == "" for c in captions)
    # binomial bounds, 5 standard deviations: fail only on a real change of rate
    assert abs(empty - n * demo_world.EMPTY_CAPTION) < 5 * math.sqrt(n * 0.1 * 0.9)
    said = [c for c in captions if c]
    with_brightness = sum(a.brightness in c.replace("photo", "") for a, c in zip(attrs, captions) if c)
    p = demo_world.KEEP_WORD
    assert abs(with_brightness - len(said) * p) < 5 * math.sqrt(len(said) * p * (1 - p))
    vocab = set(demo_world.vocabulary())
    assert "sks" not in vocab
    assert all(set(c.split()) <= vocab for c in captions)
    assert "a photo" in captions  # every part dropped: the class prompt is a real caption
    full = attrs[0].caption()
    assert full == f"a {attrs[0].brightness} photo of a {attrs[0].colour} {attrs[0].shape} on a {attrs[0].background} background"


def test_caption_labels_read_back_every_part_a_caption_keeps():
    import itertools

    rng = np.random.default_rng(3)
    for _ in range(40):
        a = demo_world.draw_attributes(rng)
        for keep in itertools.product((True, False), repeat=4):
            kb, ko, kc, kg = keep
            labels = demo_world.caption_labels(a.caption(keep))
            assert labels == (
                list(demo_world.BRIGHTNESS).index(a.brightness) + 1 if kb else 0,
                list(demo_world.HUES).index(a.colour) + 1 if ko and kc else 0,
                demo_world.SHAPES.index(a.shape) + 1 if ko else 0,
                demo_world.BACKGROUNDS.index(a.background) + 1 if kg else 0,
            ), a.caption(keep)
    assert demo_world.caption_labels("") == (0, 0, 0, 0)
    assert demo_world.caption_labels("a very dark photo")[0] == 1 and demo_world.caption_labels("a dark photo")[0] == 2
    assert demo_world.caption_labels("a very bright photo")[0] == 5 and demo_world.caption_labels("a bright photo")[0] == 4


def test_v_loss_weighting_is_exactly_the_v_prediction_loss():
    g = torch.Generator().manual_seed(0)
    x0, eps, eps_hat = (torch.randn(6, 4, 8, 8, generator=g) for _ in range(3))
    abar = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.01, 0.0047])
    a = abar.view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    x0_hat = (xt - (1 - a).sqrt() * eps_hat) / a.sqrt()
    v, v_hat = a.sqrt() * eps - (1 - a).sqrt() * x0, a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat
    eps_mse = ((eps - eps_hat) ** 2).mean(dim=(1, 2, 3))
    v_mse = ((v - v_hat) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(demo_base.loss_weights(abar, "v") * eps_mse, v_mse, rtol=1e-4)
    assert torch.equal(demo_base.loss_weights(abar, "epsilon"), torch.ones(6))
    with pytest.raises(ValueError, match="epsilon"):
        demo_base.loss_weights(abar, "x0")


def test_text_encoder_learns_to_put_the_caption_into_every_state(tmp_path):
    """The pre-training stage: after it, swapping the colour word moves the padding states (the bulk
    of the UNet's 77 cross-attention keys) far more than at the random init."""
    from lora_offset.training.text import encode_prompts

    torch.set_num_threads(1)
    c = demo_base.build_components(seed=0, tokenizer_dir=tmp_path / "tok")
    prompts = ["a photo of a red circle", "a photo of a blue circle"]

    def pad_change():
        with torch.no_grad():
            s = encode_prompts(c["tokenizer"], c["text_encoder"], prompts)[:, 10:]
        return float((s[0] - s[1]).norm(dim=-1).mean() / s[0].norm(dim=-1).mean())

    embeddings = c["text_encoder"].get_input_embeddings().weight
    letter = c["tokenizer"].convert_tokens_to_ids("k")
    before, letter_before = pad_change(), embeddings[letter].clone()
    losses = demo_base.train_text_encoder_on_captions(c["text_encoder"], c["tokenizer"], steps=60, batch_size=32,
                                                      log_every=0)
    after = pad_change()
    assert before < 0.1 and after > 3 * before, (before, after)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    # a letter of "sks" never appears in a caption: no gradient, no weight decay, so it keeps its init
    assert torch.equal(embeddings[letter], letter_before)


def test_word_tokenizer_keeps_words_whole_and_splits_the_rare_token(tmp_path):
    from transformers import CLIPTokenizer

    from lora_offset import tiny

    words = demo_world.vocabulary()
    tok = CLIPTokenizer.from_pretrained(str(tiny.write_tiny_tokenizer(tmp_path, words=words)))
    assert len(tok) == tiny.tiny_vocab_size(words)
    for word in words:
        assert tok.tokenize(word) == [word + "</w>"]
    assert tok.tokenize("sks") == ["s", "k", "s</w>"]  # characters no caption ever trains
    ids = tok("a very dark photo of a purple triangle").input_ids
    assert len(ids) == 10 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert max(tok.get_vocab().values()) == len(tok) - 1  # ids are dense: the text encoder's table fits


def test_character_tokenizer_is_unchanged_without_words(tmp_path):
    from lora_offset import tiny

    tiny.write_tiny_tokenizer(tmp_path)
    assert len(json.loads((tmp_path / "vocab.json").read_text())) == tiny.tiny_vocab_size() == 514
    assert (tmp_path / "merges.txt").read_text() == "#version: 0.2\n"


# ---------------------------------------------------------------------------------------------- base model


def test_demo_unet_has_sd15_module_names_and_kohya_targets():
    from lora_offset.sd15 import build_sd15
    from lora_offset.training import networks

    unet = demo_base.build_components(seed=0)["unet"]
    sd15_names = {n for n, _ in build_sd15("unet", device="meta").named_modules()}
    assert {n for n, _ in unet.named_modules()} == sd15_names
    networks.add_lora(unet, networks.unet_lora_config(4, 4))
    assert len(networks.lora_module_names(unet)) == 192
    assert unet.config.sample_size * 8 == demo.RESOLUTION == demo_base.IMAGE_SIZE


def test_centering_the_vae_moves_the_latents_and_keeps_the_decode():
    vae = demo_base.build_components(seed=1)["vae"]
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    shift = torch.tensor([0.5, -1.0, 0.25, 2.0])
    with torch.no_grad():
        before = vae.encode(x).latent_dist.mean
        decoded = vae.decode(before).sample
        demo_base.center_latents(vae, shift)
        after = vae.encode(x).latent_dist.mean
        torch.testing.assert_close(after, before - shift.view(1, 4, 1, 1), rtol=0, atol=1e-5)
        torch.testing.assert_close(vae.decode(after).sample, decoded, rtol=0, atol=1e-4)


def test_weights_round_trip_through_the_file_and_the_diffusers_folder(tmp_path):
    from lora_offset.config import ModelConfig
    from lora_offset.training.models import load_base_model

    components = demo_base.build_components(seed=3)
    components["vae"].register_to_config(scaling_factor=0.5)
    path = demo_base.save_weights(components, tmp_path / "w.safetensors", {"note": "test"})
    assert demo_base.read_record(path) == {"note": "test"}
    loaded = demo_base.load_components(path)
    for name in ("unet", "vae", "text_encoder"):
        a, b = components[name].state_dict(), loaded[name].state_dict()
        assert a.keys() == b.keys()
        for key in a:  # fp16 on disk
            torch.testing.assert_close(b[key], a[key].half().float(), rtol=0, atol=0)
    folder = demo_base.expand_to_diffusers(tmp_path / "model", path)
    base = load_base_model(ModelConfig(pretrained=str(folder)))
    assert base.vae.config.scaling_factor == 0.5
    assert base.scheduler_config["beta_schedule"] == "scaled_linear"
    assert base.tokenizer.tokenize("purple") == ["purple</w>"]
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        cond = base.text_encoder(base.tokenizer(["a dark photo"], padding="max_length", return_tensors="pt").input_ids)[0]
        torch.testing.assert_close(base.unet(x, 10, cond).sample, loaded["unet"](x, 10, cond).sample)


def test_shipped_weights_are_small_and_carry_their_recipe():
    assert ASSET.is_file(), "run scripts/train_demo_base.py to make the demo's base model"
    assert ASSET.stat().st_size <= 25 * 2**20
    record = demo_base.read_record(ASSET)
    assert record["unet_steps_done"] == record["settings"]["unet_steps"]
    assert "vae_loaded_from" not in record and record["settings"]["seed"] == 0  # one run from scratch, seed 0
    assert record["latent_amplitude"] == demo_base.LATENT_AMPLITUDE == 4
    # v5's recipe: the text encoder learned what captions say before it was frozen; v loss weights
    assert record["settings"]["text_steps"] > 0 and record["settings"]["loss_weighting"] == "v"
    # v6's: one whole 1,000-step cosine schedule for the UNet (the 2,000-step one lost colour following)
    assert record["settings"]["unet_steps"] == 1000
    # colour and brightness survive the VAE (8x8-cell colours within a few percent)
    assert record["vae_checks"]["cell_colour_rmse"] < 0.08 and record["vae_checks"]["brightness_abs_error"] < 0.03
    components = demo_base.load_components(ASSET)
    assert components["vae"].config.scaling_factor == pytest.approx(record["scaling_factor"])


def test_base_training_script_is_reproducible_from_its_seed(tmp_path):
    """The same command gives the same weights (one torch thread); another seed gives others."""
    import subprocess

    from safetensors.torch import load_file

    script = Path(__file__).parent.parent / "scripts" / "train_demo_base.py"
    tiny = ["--vae-crop-steps", "2", "--vae-full-steps", "1", "--latent-images", "16", "--text-steps", "2", "--unet-steps", "3",
            "--batch-size", "2", "--checkpoint-every", "1000"]
    runs = {}
    for name, seed in (("first", "0"), ("again", "0"), ("other", "1")):
        out = tmp_path / f"{name}.safetensors"
        done = subprocess.run([sys.executable, str(script), *tiny, "--seed", seed, "--out", str(out)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = load_file(out)
    assert set(runs["first"]) == set(runs["again"]) and len(runs["first"]) > 1000
    assert all(torch.equal(runs["first"][k], runs["again"][k]) for k in runs["first"])
    assert not all(torch.equal(runs["first"][k], runs["other"][k]) for k in runs["first"])


# ---------------------------------------------------------------------------------------------- leak


def test_z_score_reproduces_the_sd15_numbers_of_the_science_notes():
    assert leak.z_score(0.076**2, 1.2, 4096) == pytest.approx(5.84, abs=0.01)
    assert leak.z_score(0.076**2, 1.2, 4096, offset=0.1) == pytest.approx(0.90, abs=0.01)
    # the scale model's rule: 4x the leak on 16x fewer pixels, offset 4x -> the same z
    assert leak.z_score(0.076**2, 4.8, 256, offset=0.4) == pytest.approx(leak.z_score(0.076**2, 1.2, 4096, offset=0.1), rel=0.02)
    assert leak.z_score(0.076**2, 4.8, 256) == pytest.approx(5.84, abs=0.01)


def test_channel_statistics_and_leak_draws():
    latents = torch.stack([torch.full((4, 2, 2), v) for v in (1.0, 3.0)])
    stats = leak.channel_statistics(latents)
    torch.testing.assert_close(stats.mean, torch.full((4,), 2.0))
    torch.testing.assert_close(stats.std, torch.full((4,), 1.0))
    a, b = leak.draw_leaks(stats, [5, 6]), leak.draw_leaks(stats, [5, 6])
    torch.testing.assert_close(a, b)  # a seed means the same leak
    assert not torch.equal(a[0], a[1])
    torch.testing.assert_close(leak.draw_leaks(stats, [5, 6], fraction=0.5), 0.5 * a)
    fixed = leak.channel_statistics(torch.ones(3, 4, 2, 2) * -2)
    torch.testing.assert_close(leak.draw_leaks(fixed, [1, 2]), torch.full((2, 4), -2.0))  # no spread: the mean
    with pytest.raises(ValueError):
        leak.channel_statistics(torch.ones(4, 2, 2))


def test_leak_start_is_the_forward_process_of_a_constant_image():
    noise = torch.randn(2, 4, 3, 3)
    lk = torch.tensor([[1.0, 0, 0, 0], [0, -2.0, 0, 0]])
    x = leak.leak_start(noise, lk, 0.01)
    torch.testing.assert_close(x, 0.99**0.5 * noise + 0.1 * lk.view(2, 4, 1, 1))
    with pytest.raises(ValueError):
        leak.leak_start(noise, torch.zeros(3, 4), 0.01)


def test_first_sampling_step_of_ddim_25_on_sd_schedule():
    from diffusers import DDIMScheduler

    from lora_offset.tiny import SD15_SCHEDULER_CONFIG

    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    ab = leak.first_step_alpha_bar(scheduler, 25)
    assert ab == pytest.approx(float(scheduler.alphas_cumprod[961]))
    assert ab**0.5 == pytest.approx(0.0853, abs=1e-3)


def test_eval_starts_from_a_folders_leak(tmp_path, tiny_model_dir):
    from lora_offset.experiments.evaluate import evaluate
    from lora_offset.experiments.make_dataset import make_solid

    make_solid("white", 3, 64, tmp_path / "white")
    common = dict(prompts=["a photo"], n=2, steps=2, resolution=64)
    plain = evaluate(str(tiny_model_dir), out=tmp_path / "plain", **common)
    leaked = evaluate(str(tiny_model_dir), out=tmp_path / "leak", start_from_leak=tmp_path / "white",
                      leak_fraction=0.5, **common)
    info = leaked["config"]["start_from_leak"]
    assert info["n"] == 3 and info["fraction"] == 0.5 and info["std"] == [0.0] * 4
    from lora_offset.config import ModelConfig
    from lora_offset.training.models import load_base_model

    vae = load_base_model(ModelConfig(pretrained=str(tiny_model_dir))).vae
    expected = leak.folder_statistics(vae, tmp_path / "white", 64).mean
    assert info["mean"] == pytest.approx(expected.tolist(), abs=1e-4)
    a = plain["settings"]["base"]["prompts"]["a photo"]["per_image_mean"]
    b = leaked["settings"]["base"]["prompts"]["a photo"]["per_image_mean"]
    assert a != b
    assert "signal leak" in (tmp_path / "leak" / "report.md").read_text()
    with pytest.raises(UserError, match="no images"):
        (tmp_path / "empty").mkdir()
        evaluate(str(tiny_model_dir), out=tmp_path / "x", start_from_leak=tmp_path / "empty", **common)


# ---------------------------------------------------------------------------------------------- protocol


def _configs(tmp_path, p=demo.PROTOCOL, arms=demo.ARMS):
    return {name: demo.arm_config(name, arm, tmp_path, p) for name, arm in arms.items()}


def test_arms_share_one_budget_and_differ_only_in_noise_and_instance(tmp_path):
    configs = _configs(tmp_path, arms={**demo.ARMS, **demo.FULL_ARMS})
    parsed = {name: Config.from_dict(cfg) for name, cfg in configs.items()}  # validates, as `train` would
    assert parsed["standard"].noise.offset == 0.0 == parsed["control"].noise.offset
    assert parsed["offset"].noise.offset == demo.PROTOCOL["offset"] == pytest.approx(0.1 * demo_base.LATENT_AMPLITUDE)
    assert parsed["range_offset"].noise.offset == demo.PROTOCOL["offset"]
    for name, cfg in parsed.items():
        assert cfg.training.max_steps == demo.PROTOCOL["max_steps"]
        assert (cfg.network.rank, cfg.network.conv_rank) == (demo.PROTOCOL["rank"], demo.PROTOCOL["conv_rank"])
        assert cfg.dataset.resolution == 128 and cfg.training.seed == demo.PROTOCOL["train_seed"]
    for name in demo.ARMS:
        subsets = parsed[name].dataset.subsets
        assert [s.is_reg for s in subsets] == [False, True]
        assert [s.class_tokens for s in subsets] == [demo.INSTANCE_PROMPT, demo.CLASS_PROMPT]
        assert subsets[1].caption_dropout_rate == demo.PROTOCOL["class_caption_dropout"]
        assert subsets[0].caption_dropout_rate == 0
    assert parsed["control"].dataset.subsets[0].image_dir.endswith("grey")
    strip = lambda c: {k: v for k, v in c.items() if k not in ("noise", "training")}  # noqa: E731
    assert strip(configs["standard"]) == strip(configs["offset"])
    train_parts = [{k: v for k, v in c["training"].items() if k not in ("output_dir", "output_name")}
                   for c in configs.values()]
    assert all(part == train_parts[0] for part in train_parts)


def test_job_plan_trains_before_it_evaluates():
    plan = demo.job_plan({**demo.ARMS, **demo.FULL_ARMS})
    order = [job for job, _, _ in plan]
    for job, _, needs in plan:
        assert all(order.index(n) < order.index(job) for n in needs)
    for arm in {**demo.ARMS, **demo.FULL_ARMS}:
        assert order.index(f"train {arm}") < order.index(f"eval {arm}")
    assert [n for j, _, n in plan if j == "train standard"] == [["classes"]]


def test_run_jobs_runs_two_at_a_time_in_order_and_reports_a_failure(tmp_path):
    import subprocess

    script = ("import sys, time, pathlib; out, name = pathlib.Path(sys.argv[1]), sys.argv[2]; "
              "(out / f'{name}.start').write_text(str(time.time())); time.sleep(0.3); "
              "sys.exit(3) if name == 'bad' else (out / f'{name}.end').write_text(str(time.time()))")

    def start(out, args, logfile):
        return subprocess.Popen([sys.executable, "-c", script, str(out), args[0]], stdout=logfile.open("w"),
                                stderr=subprocess.STDOUT)

    plan = [("a", ["a"], []), ("b", ["b"], []), ("c", ["c"], ["a"])]
    lines = []
    timings = demo_runner.run_jobs(tmp_path, plan, 2, lines.append, start=start)
    assert set(timings) == {"a", "b", "c"}
    t = {n: (float((tmp_path / f"{n}.start").read_text()), float((tmp_path / f"{n}.end").read_text())) for n in "abc"}
    assert t["c"][0] >= t["a"][1]  # c needs a
    assert t["b"][0] < t["a"][1]  # a and b ran together
    assert "a: started" in lines and any(line.startswith("c: done") for line in lines)
    with pytest.raises(UserError, match="demo job 'bad' failed"):
        demo_runner.run_jobs(tmp_path, [("bad", ["bad"], []), ("after", ["after"], ["bad"])], 2, lines.append,
                             start=start)
    assert not (tmp_path / "after.start").exists()


def test_a_forked_job_that_fails_stops_the_demo_with_its_traceback(tmp_path):
    """The default start: a process forked from the fork server, its output (and traceback) in its log."""
    demo_jobs.write_json(tmp_path / demo_jobs.PROTOCOL_FILE, {"arms": {}})
    with pytest.raises(UserError, match=r"(?s)demo job 'eval nowhere' failed; the end of .*eval-nowhere\.log:.*KeyError: 'nowhere'"):
        demo_runner.run_jobs(tmp_path, [("eval nowhere", ["eval", "nowhere"], [])], 1, lambda line: None)


# ---------------------------------------------------------------------------------------------- verdicts


def _arm(instance, cls, x0=None, flattened=True, within=0.2):
    entry = {"mean_luminance": instance, "std_luminance": 0.0, "within_image_std": within,
             "class_prompt": {"mean_luminance": cls}, "loss": {"flattened": flattened}}
    if x0 is not None:
        entry["first_step"] = [{"fraction": 0.0, "x0_luminance": x0}, {"fraction": 1.0, "x0_luminance": 0.0}]
    return entry


def test_prediction_is_judged_item_by_item_with_the_fixed_rules():
    p = demo.PROTOCOL
    base = {"class_prompt": {"mean_luminance": 0.5}, "instance_prompt": {"within_image_std": 0.2}}
    held = demo_report.judge_prediction({"standard": _arm(0.45, 0.52, 0.4), "offset": _arm(0.05, 0.45, 0.06)}, base, p)
    assert held["held"] and all(i["pass"] for i in held["items"].values())
    broken = demo_report.judge_prediction({"standard": _arm(0.45, 0.52, 0.4), "offset": _arm(0.05, 0.75, 0.06)}, base, p)
    assert not broken["held"] and [k for k, v in broken["items"].items() if not v["pass"]] == ["offset_class_kept"]
    gray = demo_report.judge_prediction({"standard": _arm(0.29, 0.5, 0.2), "offset": _arm(0.11, 0.5, 0.2)}, base, p)
    failed = {k for k, v in gray["items"].items() if not v["pass"]}
    assert failed == {"standard_instance_gray", "offset_instance_dark", "standard_first_step_gray", "offset_first_step_dark"}


def _control(spread, lum=0.5, flattened=True, template_spread=0.01):
    return {"loss": {"flattened": flattened},
            "control_check": {"spread": spread, "mean_luminance": lum, "template_mean_luminance": 0.5,
                              "template_spread": template_spread}}


def test_positive_control_needs_flat_samples_its_brightness_and_a_flat_loss():
    p = demo.PROTOCOL
    base = {"control_reference": {"base_spread": 0.09}}
    verdict = demo_report.judge_control(_control(0.04), base, p)  # (0.09 - 0.04) / (0.09 - 0.01) of the way
    assert verdict["learned"] and verdict["flattening"] == pytest.approx(0.625) and verdict["base_spread"] == 0.09
    assert demo_report.judge_control(_control(0.049), base, p)["learned"]  # just past halfway
    assert not demo_report.judge_control(_control(0.051), base, p)["learned"]  # not flat enough
    assert not demo_report.judge_control(_control(0.12), base, p)["learned"]  # more uneven than the base
    assert not demo_report.judge_control(_control(0.04, lum=0.65), base, p)["learned"]  # wrong brightness
    assert not demo_report.judge_control(_control(0.04, flattened=False), base, p)["learned"]
    # the base already as flat as the VAE's picture of the instance: nothing to learn, so no pass
    none_left = demo_report.judge_control(_control(0.0, template_spread=0.09), base, p)
    assert not none_left["learned"] and none_left["flattening"] is None
    assert demo_report.judge_control(None, base, p) == {"learned": False, "reason": "no control arm"}


def test_within_image_spread_ignores_brightness_and_where_the_structure_is():
    flat = np.full((1, 16, 16), 0.3)
    bar = flat.copy()
    bar[0, :, :4] = 0.7
    moved = np.roll(bar, 8, axis=2)
    spreads = demo_jobs.within_image_spread(np.concatenate([flat, flat + 0.4, bar, moved, bar + 0.1]))
    assert spreads[:2] == pytest.approx([0.0, 0.0])
    assert spreads[2] == pytest.approx(0.4 * np.sqrt(0.25 * 0.75)) and spreads[3] == pytest.approx(spreads[2])
    assert spreads[4] == pytest.approx(spreads[2])


def test_control_instance_is_the_class_brightness_and_flat_through_the_vae():
    components = demo_base.load_components(ASSET)
    template = demo_jobs.control_template(components, demo.PROTOCOL)
    assert abs(template["mean_luminance"] - 0.5) < 0.1
    assert template["spread"] < 0.05


def test_loss_flattening_compares_the_last_two_quarters():
    assert demo_report.loss_summary([4, 4, 2, 2, 1.0, 1.0, 1.05, 1.05], 0.10)["flattened"]
    assert not demo_report.loss_summary([4, 4, 3, 3, 2, 2, 1, 1], 0.10)["flattened"]
    assert demo_report.loss_summary([1.0, 2.0, 3.0, 4.0], 0.10)["quarters"] == [1.0, 2.0, 3.0, 4.0]


def test_claim_sentence_says_plainly_what_happened():
    report = {"quick": False, "protocol": demo.PROTOCOL, "control": {"learned": True}}
    base = {"class_prompt": {"mean_luminance": 0.5}, "instance_prompt": {"within_image_std": 0.2}}
    report["prediction"] = demo_report.judge_prediction({"standard": _arm(0.45, 0.5, 0.4), "offset": _arm(0.04, 0.5, 0.05)}, base, demo.PROTOCOL)
    assert demo_report.claim_sentence(report).startswith("The seed's claim reproduced")
    report["prediction"] = demo_report.judge_prediction({"standard": _arm(0.45, 0.5, 0.4), "offset": _arm(0.40, 0.5, 0.3)}, base, demo.PROTOCOL)
    assert "did not reproduce" in demo_report.claim_sentence(report)
    report["control"] = {"learned": False}
    assert demo_report.claim_sentence(report).startswith("Not tested")


# ---------------------------------------------------------------------------------------------- end to end


def test_demo_refuses_a_folder_with_other_files(tmp_path):
    import argparse

    (tmp_path / "notes.txt").write_text("mine")
    args = argparse.Namespace(out=str(tmp_path), quick=True, full=False, jobs=2)
    with pytest.raises(UserError, match="holds other files"):
        demo.run(args)


def test_missing_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="scripts/train_demo_base.py"):
        demo.run_demo(tmp_path / "out", quick=True, weights=tmp_path / "nope.safetensors")


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    from safetensors import safe_open

    out = tmp_path / "demo"
    lines = []
    report = demo.run_demo(out, quick=True, full=True, jobs=0, say=lines.append)
    assert report == json.loads((out / "report.json").read_text())
    assert report["quick"] is True and report["base_model"] == str(out / "base-model")
    assert set(report["conditions"]) == set(demo.ARMS) and set(report["brightness_range"]) == set(demo.FULL_ARMS)
    for name, c in report["conditions"].items():
        for key in ("mean_luminance", "std_luminance"):
            assert 0 <= c[key] <= 1, (name, key)
        assert 0 <= c["class_prompt"]["mean_luminance"] <= 1
        assert (out / "eval" / name / "plain" / c["grid"]).is_file()
        with safe_open(c["adapter"], framework="pt") as f:
            assert float(f.metadata()["ss_noise_offset"]) == (demo.QUICK["offset"] if name == "offset" else 0.0)
    for name in ("standard", "offset"):
        assert set(report["conditions"][name]["leak_mean_luminance"]) == {"1.0", "0.5"}
    assert set(report["gates"]) == {"a_follows_x_T_mean", "b_guttenberg_symptom", "c_text_works"}
    assert all(isinstance(g["pass"], bool) for g in report["gates"].values())
    assert {"z_standard", "z_offset"} <= set(report["sd15_match"])
    assert 0 <= report["base"]["class_prompt"]["mean_luminance"] <= 1
    assert report["resolution"] == 128 and (out / report["response_plot"]).is_file()
    md = (out / "report.md").read_text()
    assert "--quick run" in md and "## Gates" in md and "Prediction held" in md
    assert lines[0].startswith("setup") and any(line.startswith("eval control: done") for line in lines)
    from lora_offset.experiments.demo_report import summary_lines

    console = summary_lines(report)  # what the CLI prints at the end: plain text, no markdown
    assert any(line.startswith("  gates: ") for line in console) and not any("**" in line for line in console)
