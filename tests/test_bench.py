"""bench/train_bench.py: the --tiny harness end to end on CPU, and its pure pieces (bench_report.py's peaks,
ratios and targets; the step hooks)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train_bench.py"


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_script(SCRIPT)
bench_report = load_script(SCRIPT.with_name("bench_report.py"))
NUMERIC = ("it_per_s", "images_per_s", "step_time_median_s", "flops_per_step", "tflops_per_s", "total_s")
GPU_ONLY = ("peak_allocated_gb", "peak_reserved_gb", "loop_peak_allocated_gb", "mfu")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--tiny", "--out", str(out), "--warmup", "1", "--steps", "2"]) == 0
    return out, json.loads((out / "bench.json").read_text(encoding="utf-8"))


def test_tiny_report_has_every_profile_with_numeric_fields(tiny_report):
    out, report = tiny_report
    assert report["tiny"] is True
    assert set(report["profiles"]) == {"consumer", "consumer-fp8", "consumer-nf4", "throughput", "naive"}
    for name, r in report["profiles"].items():
        for key in NUMERIC:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        for key in GPU_ONLY:
            assert r[key] is None, (name, key)  # no CUDA metrics on a CPU, rather than made-up ones
        assert r["timed_steps"] == 2 and r["skipped_steps"] == 0
        assert r["images_per_s"] == pytest.approx(r["it_per_s"] * r["settings"]["batch_size"])
        assert r["tflops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_time_median_s"] / 1e12)
        assert math.isfinite(r["final_loss"])
        assert len(list((out / "data" / "images-64px-16").glob("*.png"))) == 16
    env = report["environment"]
    assert env["device"].startswith("CPU") and env["peak_tflops"] is None
    assert env["torch"] == torch.__version__ and env["command"].startswith("python bench/train_bench.py --tiny")
    assert set(report["ratios"]) == {"consumer/naive", "consumer-fp8/naive", "consumer-nf4/naive", "throughput/naive"}
    assert report["ratios"]["throughput/naive"]["images_per_s"] > 0
    assert report["ratios"]["consumer/naive"]["peak_allocated"] is None
    assert all(v is None for v in report["targets"].values())


def test_tiny_profiles_run_the_settings_they_name(tiny_report):
    _, report = tiny_report
    c, t, n = (report["profiles"][k] for k in ("consumer", "throughput", "naive"))
    assert (c["settings"]["batch_size"], t["settings"]["batch_size"], n["settings"]["batch_size"]) == (1, 8, 1)
    assert c["settings"]["optimizer"] == "adamw8bit" and n["settings"]["optimizer"] == "adamw"
    assert t["settings"]["weight_dtype"] == "bfloat16" and n["settings"]["weight_dtype"] == "float32"
    assert t["settings"]["torch_compile"] is False and any("torch_compile" in x for x in t["notes"])
    assert n["settings"]["cache_text_embeddings"] is False and n["settings"]["cache_latents"] is False
    assert all(r["settings"]["attention"] == ["AttnProcessor2_0"] for r in (c, t, n))  # SDPA
    # The FLOP counts show the settings took effect: per image, the plain UNet step (throughput, batch 8)
    # costs less than a checkpointed one (forward recomputed) and than one that runs the VAE and text encoder.
    per_image = t["flops_per_step"] / 8
    assert per_image < c["flops_per_step"] < 2 * per_image
    assert per_image < n["flops_per_step"] < 2 * per_image


def test_tiny_quantized_profiles_store_the_unet_smaller_and_train_the_same_step(tiny_report):
    _, report = tiny_report
    c, fp8, nf4 = (report["profiles"][k] for k in ("consumer", "consumer-fp8", "consumer-nf4"))
    assert (c["settings"]["base_precision"], fp8["settings"]["base_precision"], nf4["settings"]["base_precision"]) \
        == ("auto", "fp8", "nf4")
    for r in (fp8, nf4):  # everything else is the consumer profile's
        assert {k: v for k, v in r["settings"].items() if k != "base_precision"} == \
            {k: v for k, v in c["settings"].items() if k != "base_precision"}
    # --tiny computes in fp32 (fp16 falls back on a CPU): fp8 is a quarter of that, NF4 about an eighth; the
    # tiny UNet's norm layers (kept in fp32) are a larger share than in SD 1.5, hence the loose bounds.
    assert fp8["frozen_unet_gb"] < 0.35 * c["frozen_unet_gb"]
    assert nf4["frozen_unet_gb"] < 0.6 * fp8["frozen_unet_gb"]
    # the same work per step: bitsandbytes' 4-bit matmul is counted too
    assert fp8["flops_per_step"] == c["flops_per_step"]
    assert 0.95 * c["flops_per_step"] < nf4["flops_per_step"] <= c["flops_per_step"]


def test_tiny_markdown_table(tiny_report):
    out, _ = tiny_report
    md = (out / "bench.md").read_text(encoding="utf-8")
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| profile | peak alloc GB | peak reserved GB | it/s | images/s")
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["consumer", "consumer-fp8", "consumer-nf4", "throughput",
                                                          "naive"]
    assert "- consumer/naive:" in md and "not measured" in md


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", None),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),
    ("Tesla T4", None),
])
def test_peak_tflops_by_device_name(name, peak):
    found = bench_report.peak_tflops(name)
    assert (found[0] if found else None) == peak


def test_ratios_and_targets():
    results = {
        "naive": {"peak_allocated_gb": 10.0, "peak_reserved_gb": 12.0, "it_per_s": 4.0, "images_per_s": 4.0},
        "consumer": {"peak_allocated_gb": 3.0, "peak_reserved_gb": 3.6, "it_per_s": 6.0, "images_per_s": 6.0},
        "throughput": {"peak_allocated_gb": 30.0, "peak_reserved_gb": 36.0, "it_per_s": 2.0, "images_per_s": 16.0,
                       "mfu": 0.30},
    }
    r = bench_report.ratios(results)
    assert r["consumer/naive"] == pytest.approx({"peak_allocated": 0.3, "peak_reserved": 0.3, "it_per_s": 1.5,
                                                 "images_per_s": 1.5})
    assert r["throughput/naive"]["images_per_s"] == pytest.approx(4.0)
    t = bench_report.targets(results, r)
    assert t == {"consumer peak allocated <= 3.5 GB": True, "consumer >= 5 it/s": True,
                 "consumer-nf4 peak allocated <= 1.5 GB": None,  # not in this run
                 "throughput MFU >= 35 %": False, "consumer memory <= 0.4 x naive": True}
    results["consumer-nf4"] = {"peak_allocated_gb": 1.4, "peak_reserved_gb": 1.6, "it_per_s": 4.0, "images_per_s": 4.0}
    assert bench_report.targets(results, r)["consumer-nf4 peak allocated <= 1.5 GB"] is True
    results["naive"] = {"profile": "naive", "error": "CUDA out of memory"}
    assert bench_report.ratios(results) == {}


def test_step_hooks_time_finished_steps_and_count_one_step():
    hooks = bench.StepHooks(cuda=False, flop_step=3)
    a = torch.randn(16, 32)
    b = torch.randn(32, 8)
    for step in range(5):
        hooks.on_step_start(step)
        a @ b
        if step != 1:  # step 1 is non-finite: train() calls no on_step_end for it
            hooks.on_step_end(step + 1, 0.5)
    hooks.close()
    assert len(hooks.step_times(0, 3)) == 3  # steps 0, 2, 3; step 4 has no next start
    assert all(t >= 0 for t in hooks.step_times(0, 3))
    assert hooks.flops == 2 * 16 * 32 * 8  # only step 3's matmul
    assert sorted(hooks.finished) == [0, 2, 3, 4]


def test_flop_counter_counts_cpu_attention():
    q = torch.randn(1, 2, 64, 8, requires_grad=True)
    with bench.flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    forward = 2 * (2 * 64 * 64 * 8)  # scores and values, 2 FLOPs per multiply-add
    assert counter.get_total_flops() >= 2 * forward  # forward + backward


def test_sd15_shaped_tokenizer_has_clip_ids(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(bench.write_sd15_shaped_tokenizer(tmp_path / "tok")))
    assert len(tok) == 49408
    ids = tok(["a photo of sks"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
    assert max(ids) == 49407 and min(ids) >= 0


def test_sd15_base_model_sizes_on_meta():
    # The full-size components the GPU benchmark trains: SD 1.5's parameter counts.
    from lora_offset.sd15 import build_sd15

    counts = {n: sum(p.numel() for p in build_sd15(n, "meta").parameters()) for n in ("unet", "vae", "text_encoder")}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_full_size_without_gpu_is_a_clear_error(tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_unknown_profile_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--out", str(tmp_path), "--profiles", "consumer,fastest"])


@pytest.mark.slow
def test_script_runs_as_ci_calls_it(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path), "--profiles", "naive",
                           "--warmup", "1", "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert list(report["profiles"]) == ["naive"] and report["profiles"]["naive"]["it_per_s"] > 0


@pytest.mark.slow
def test_memory_estimate_consumer_and_naive():
    est = load_script(SCRIPT.with_name("memory_estimate.py"))
    consumer, naive = est.estimate("consumer"), est.estimate("naive")
    assert consumer["UNet weights (fp16)"] == pytest.approx(859_520_964 * 2 / 1e9)
    assert consumer["LoRA weights (fp32)"] == pytest.approx(13_565_952 * 4 / 1e9)  # rank 32, 192 modules
    assert consumer["total"] == pytest.approx(sum(v for k, v in consumer.items() if k != "total"))
    ckpt = consumer["UNet activations, checkpointed (saved)"] + consumer["UNet activations, largest block recomputed"]
    full = naive["UNet activations, no checkpointing (saved)"]
    # fp32 without checkpointing keeps far more than fp16 with it; both are real, non-trivial amounts
    assert 0.02 < ckpt < full / 4 and 0.5 < full < 8
    assert consumer["total"] < 0.4 * naive["total"]
    with pytest.raises(ValueError, match="consumer"):
        est.estimate("throughput")


def test_a_failing_profile_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    real = bench.run_profile

    def flaky(name, **kwargs):
        if name == "consumer":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return real(name, **kwargs)

    monkeypatch.setattr(bench, "run_profile", flaky)
    code = bench.main(["--tiny", "--out", str(tmp_path), "--profiles", "consumer,naive", "--warmup", "1", "--steps", "1"])
    assert code == 1
    report = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert report["profiles"]["consumer"]["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert report["profiles"]["naive"]["it_per_s"] > 0
    assert report["ratios"] == {}
    assert "| consumer | error: RuntimeError" in (tmp_path / "bench.md").read_text(encoding="utf-8")


def load_base_memory():
    spec = importlib.util.spec_from_file_location("base_memory_cpu", SCRIPT.parent / "base_memory_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_base_memory_table_and_arguments(tmp_path):
    """bench/base_memory_cpu.py's report (its full-size run takes minutes and GBs: docs/PERFORMANCE.md has one)."""
    mem = load_base_memory()
    row = {"storage": "x", "rss_frozen_base": 2e9, "rss_libraries": 0.5e9, "peak_rss_step": 4e9, "step_s": [80.0]}
    report = {"environment": {"device": "CPU: test", "torch": "t", "diffusers": "d", "peft": "p", "bitsandbytes": "b",
                              "python": "3", "date_utc": "now", "command": "python bench/base_memory_cpu.py --out x"},
              "settings": {"rank": 32, "alpha": 16.0, "resolution": 512, "steps": 1, "threads": 1,
                           "gradient_checkpointing": True, "malloc_mmap_threshold": None},
              "results": [{**row, "precision": "fp16", "frozen_bytes": 1_719_442_568},
                          {**row, "precision": "nf4", "frozen_bytes": 445_253_732},
                          {"precision": "fp8", "error": "MemoryError"}]}
    rows = [line for line in mem.markdown(report).splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| fp16 | x | 1.719 | 1.000x |")
    assert rows[2].startswith("| nf4 | x | 0.445 | 0.259x |")
    assert rows[3].startswith("| fp8 | error: MemoryError")
    with pytest.raises(SystemExit):
        mem.main(["--out", str(tmp_path), "--precisions", "fp8,int4"])
    assert mem.rss_bytes() > 0 and mem.peak_rss_bytes() >= mem.rss_bytes()
