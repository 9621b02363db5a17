"""The optimizer registry, LoRA+ groups, optimizer_args checks, learning-rate schedules, and resume per optimizer."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from lora_offset.cli import main
from lora_offset.errors import UserError
from lora_offset.training import optimizers
from tests.test_train import make_images, write_config


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "10_sks dog", 4)


def named(prefix: str, n: int) -> dict[str, torch.nn.Parameter]:
    """n LoRA modules' (lora_A, lora_B) parameters, named as PEFT names them."""
    params = {}
    for i in range(n):
        params[f"{prefix}.{i}.lora_A.default.weight"] = torch.nn.Parameter(torch.zeros(2, 3))
        params[f"{prefix}.{i}.lora_B.default.weight"] = torch.nn.Parameter(torch.zeros(3, 2))
    return params


# ---- parameter groups ---------------------------------------------------------------------------


def test_groups_unet_and_text_encoder_at_their_learning_rates():
    unet, te = named("unet", 2), named("te", 1)
    groups = optimizers.param_groups("adamw", unet, te, 1e-4, 5e-5, None)
    assert [(len(g["params"]), g["lr"]) for g in groups] == [(4, 1e-4), (2, 5e-5)]
    assert [len(g["params"]) for g in optimizers.param_groups("adamw", unet, {}, 1e-4, None, None)] == [4]


def test_loraplus_gives_the_up_matrices_ratio_times_the_learning_rate():
    unet, te = named("unet", 2), named("te", 1)
    groups = optimizers.param_groups("adamw8bit", unet, te, 1e-4, 5e-5, 16.0)
    assert [g["lr"] for g in groups] == [1e-4, 1.6e-3, 5e-5, 8e-4]
    ups = {id(p) for n, p in {**unet, **te}.items() if "lora_B" in n}
    assert all(id(p) in ups for g in (groups[1], groups[3]) for p in g["params"])
    assert not any(id(p) in ups for g in (groups[0], groups[2]) for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == 6


def test_prodigy_gets_one_group_and_warnings(caplog):
    unet, te = named("unet", 2), named("te", 1)
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        groups = optimizers.param_groups("prodigy", unet, te, 0.5, 1e-4, None)
    assert [(len(g["params"]), g["lr"]) for g in groups] == [(6, 0.5)]
    assert "training.text_encoder_lr is ignored with prodigy" in caplog.text
    assert "training.learning_rate = 0.5 with prodigy" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora_offset"):
        optimizers.param_groups("prodigy", unet, {}, 1.0, None, None)
    assert caplog.text == ""
    with pytest.raises(UserError, match="network.loraplus_lr_ratio needs a learning rate per group; prodigy"):
        optimizers.param_groups("prodigy", unet, te, 1.0, None, 16.0)


# ---- optimizer_args ------------------------------------------------------------------------------


def test_optimizer_args_are_checked_against_the_constructor():
    with pytest.raises(UserError, match=r"training.optimizer_args.d_cof: prodigyopt.prodigy.Prodigy has no argument "
                                        r"'d_cof'; did you mean 'd_coef'\?"):
        optimizers.check_optimizer_args("prodigy", {"d_cof": 2})
    with pytest.raises(UserError, match="training.optimizer_args.lr: set training.learning_rate instead"):
        optimizers.check_optimizer_args("adamw", {"lr": 1e-3})
    with pytest.raises(UserError, match="training.optimizer_args.weight_decay: set training.weight_decay instead"):
        optimizers.check_optimizer_args("lion", {"weight_decay": 0.1})
    with pytest.raises(UserError, match="relative_step = true makes Adafactor ignore"):
        optimizers.check_optimizer_args("adafactor", {"relative_step": True})
    assert optimizers.check_optimizer_args("prodigy", {"d_coef": 2, "betas": [0.9, 0.99]}) == {
        "d_coef": 2, "betas": (0.9, 0.99)}
    assert optimizers.check_optimizer_args("adafactor", {}) == {
        "scale_parameter": False, "relative_step": False, "warmup_init": False}


def test_an_optimizer_argument_of_the_wrong_type_names_the_type_it_needs():
    """Judged by the constructor's default, before the library compares a float with a str."""
    for name, args, message in [
        ("adamw", {"betas": "0.9,0.99"}, 'training.optimizer_args.betas = "0.9,0.99": torch.optim.adamw.AdamW takes a '
         "list of 2 numbers for betas (its default: [0.9, 0.999]); write betas = [0.9, 0.99] (a TOML array, not a string)"),
        ("adamw", {"betas": [0.9]}, "training.optimizer_args.betas = [0.9]: torch.optim.adamw.AdamW takes a list of 2 "
         "numbers for betas (its default: [0.9, 0.999])"),
        ("prodigy", {"d_coef": "2"}, 'training.optimizer_args.d_coef = "2": prodigyopt.prodigy.Prodigy takes a number '
         "for d_coef (its default: 1.0); write d_coef = 2 (no quotes, not a string)"),
        ("adamw", {"amsgrad": 1}, "training.optimizer_args.amsgrad = 1: torch.optim.adamw.AdamW takes true or false "
         "for amsgrad (its default: false)"),
    ]:
        with pytest.raises(UserError) as info:
            optimizers.check_optimizer_args(name, args)
        assert str(info.value) == message
    # an argument whose default says nothing (None) is left to the library
    assert optimizers.check_optimizer_args("adamw", {"foreach": False}) == {"foreach": False}


def test_optimizer_args_errors_come_from_the_config_before_the_model_loads(tmp_path, images, capsys):
    config = write_config(tmp_path, tmp_path / "no-model", images,
                          training={"optimizer": "lion8bit", "optimizer_args": {"beta": [0.9, 0.99]}})
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}: training.optimizer_args.beta: bitsandbytes.optim.lion.Lion8bit has no argument 'beta'; " \
           "did you mean 'betas'?" in err
    assert "no-model" not in err
    config = write_config(tmp_path, tmp_path / "no-model", images, training={"optimizer_args": {"betas": "0.9,0.99"}})
    assert main(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (  # the default optimizer, adamw8bit, as the issue met it
        f'error: {config}: training.optimizer_args.betas = "0.9,0.99": bitsandbytes.optim.adamw.AdamW8bit takes a list '
        "of 2 numbers for betas (its default: [0.9, 0.999]); write betas = [0.9, 0.99] (a TOML array, not a string)\n")


# ---- learning-rate schedules ----------------------------------------------------------------------


def schedule(steps: int, **training) -> list[float]:
    """The learning rate used at each optimizer step 0..steps-1 (learning_rate 1)."""
    from lora_offset.config import TrainingConfig

    t = TrainingConfig(learning_rate=1.0, **training)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = optimizers.make_lr_scheduler(t, optimizer, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_with_restarts_three_cycles_and_a_warmup_ratio():
    lrs = schedule(100, lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=3, lr_warmup_steps=0.05)
    assert optimizers.warmup_steps(0.05, 100) == 5  # kohya: int(ratio * steps)
    assert lrs[:5] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])  # linear warm-up over 5 steps
    # After warm-up, progress p = (step - 5) / 95 and lr = (1 + cos(pi * ((3 p) mod 1))) / 2.
    for step in (5, 20, 36, 37, 51, 68, 69, 99):
        p = (step - 5) / 95
        assert lrs[step] == pytest.approx(0.5 * (1 + math.cos(math.pi * ((3 * p) % 1.0)))), step
    assert lrs[5] == 1.0 and lrs[37] > 0.99 and lrs[36] < 0.01  # each cycle restarts at the full rate


def test_polynomial_power_and_integer_warmup():
    lrs = schedule(20, lr_scheduler="polynomial", lr_scheduler_power=2.0, lr_warmup_steps=4)
    assert lrs[:4] == pytest.approx([0, 0.25, 0.5, 0.75])
    for step in (4, 10, 19):
        # diffusers: (lr - end) * (1 - (step - warmup) / (total - warmup))^power + end, end = 1e-7
        assert lrs[step] == pytest.approx((1 - 1e-7) * (1 - (step - 4) / 16) ** 2 + 1e-7), step


@pytest.mark.parametrize("sets, message", [
    (["training.lr_warmup_steps=1.5"], "training.lr_warmup_steps must be a whole number of steps or a fraction"),
    (["training.lr_scheduler_num_cycles=0"], "training.lr_scheduler_num_cycles must be >= 1"),
    (["training.optimizer='adamw_schedulefree'", "training.lr_scheduler='cosine'"],
     'training.optimizer = "adamw_schedulefree" schedules itself'),
    (["training.optimizer='sgd'"], "training.optimizer must be one of 'adamw8bit' | 'adamw' | 'pagedadamw8bit'"),
    (["network.loraplus_lr_ratio=0"], "network.loraplus_lr_ratio must be > 0"),
    (["network.type='loha'", "network.loraplus_lr_ratio=4"], "network.loraplus_lr_ratio speeds up a LoRA's up matrices; "
                                                            "network.type = 'loha' has none"),
    (["training.optimizer_args=3"], "training.optimizer_args must be a table"),
])
def test_bad_optimizer_and_schedule_settings(tmp_path, images, sets, message, capsys):
    config = write_config(tmp_path, tmp_path / "no-model", images)
    assert main(["train", "--config", str(config)] + [a for s in sets for a in ("--set", s)]) == 2
    assert message in capsys.readouterr().err


# ---- every optimizer: a step, its state, and an exact resume ----------------------------------------


@pytest.mark.parametrize("name", list(optimizers.OPTIMIZERS))
def test_each_optimizer_steps_and_resumes_exactly(tmp_path, tiny_model_dir, images, name):
    """Run A: 2 steps, state after step 1. Run B: resumes from that state, in another folder, and takes
    step 2. The optimizer's state carries over: the two adapters are bit-identical, and differ from step 1's."""
    training = {"max_steps": 2, "optimizer": name, "save_state_every_steps": 1, "save_every_steps": 1}
    network = {"train_text_encoder": True, "loraplus_lr_ratio": None if name == "prodigy" else 4.0}
    if name == "prodigy":
        training["learning_rate"] = 1.0
    a = write_config(tmp_path / "a", tiny_model_dir, images, network=network,
                     training={**training, "output_dir": str(tmp_path / "a" / "out")})
    b = write_config(tmp_path / "b", tiny_model_dir, images, network=network,
                     training={**training, "output_dir": str(tmp_path / "b" / "out")})
    assert main(["train", "--config", str(a)]) == 0
    state = torch.load(tmp_path / "a" / "out" / "state" / "state-00000001.pt", weights_only=True)
    assert state["optimizer_name"] == name and state["optimizer"]["state"], "no optimizer state was saved"
    assert main(["train", "--config", str(b), "--resume", str(tmp_path / "a" / "out" / "state")]) == 0
    final_a = load_file(tmp_path / "a" / "out" / "tiny.safetensors")
    final_b = load_file(tmp_path / "b" / "out" / "tiny.safetensors")
    step1 = load_file(tmp_path / "a" / "out" / "tiny-step000001.safetensors")
    assert final_a.keys() == final_b.keys() == step1.keys()
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key
    assert any(not torch.equal(final_a[k], step1[k]) for k in final_a if k.endswith("lora_up.weight"))
