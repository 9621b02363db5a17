"""Every name the config accepts builds its object in the test environment (a brand-new venv in CI:
.ci/run), and a missing optional backend is one error line that names the pip command.

The names come from the code's own definitions (the config's Literal types and the registries the
validation checks against), so a name added there is tested here without editing this file."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from lora_offset.config import ModelConfig, NetworkConfig, NoiseConfig, TrainingConfig, SubsetConfig

ROOT = Path(__file__).resolve().parents[1]


def accepted(cls: type, key: str) -> tuple:
    """The values a config key's Literal type accepts (an Optional's inner Literal too)."""
    hint = typing.get_type_hints(cls)[key]
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    assert typing.get_origin(hint) is typing.Literal, f"{cls.__name__}.{key} is not a Literal"
    return typing.get_args(hint)


def test_the_names_come_from_the_registries_the_validation_uses():
    from lora_offset.training.optimizers import OPTIMIZERS
    from lora_offset.training.trackers import TRACKERS

    assert set(accepted(TrainingConfig, "optimizer")) == set(OPTIMIZERS)
    assert set(accepted(TrainingConfig, "log_with")) == set(TRACKERS)


# ------------------------------------------------------------------------------------------- samplers

def sampler_names():
    from lora_offset.experiments.sample import SAMPLERS

    return list(SAMPLERS)


@pytest.mark.parametrize("name", sampler_names())
def test_every_sampler_name_builds_its_diffusers_scheduler(name):
    import diffusers

    from lora_offset.experiments.sample import SAMPLERS, sampling_scheduler
    from lora_offset.tiny import SD15_SCHEDULER_CONFIG

    scheduler = sampling_scheduler(SD15_SCHEDULER_CONFIG, name)
    assert type(scheduler) is getattr(diffusers, SAMPLERS[name][0])
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) >= 4


# ----------------------------------------------------------------------------------------- optimizers

@pytest.mark.parametrize("name", accepted(TrainingConfig, "optimizer"))
def test_every_optimizer_name_builds_and_steps(name):
    from lora_offset.training.optimizers import OPTIMIZERS, make_optimizer, optimizer_class

    weight = torch.nn.Parameter(torch.ones(8, 8))
    optimizer = make_optimizer(name, [{"params": [weight], "lr": 1e-2}], weight_decay=0.0)
    assert isinstance(optimizer, optimizer_class(name))
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}".endswith(OPTIMIZERS[name].path.rpartition(".")[2])
    weight.grad = torch.full_like(weight, 0.5)
    optimizer.step()
    assert torch.isfinite(weight).all() and not torch.equal(weight.detach(), torch.ones(8, 8))


# -------------------------------------------------------------------------------- learning-rate schedules

def lr_scheduler_names():
    from lora_offset.training.optimizers import LR_SCHEDULERS

    return list(LR_SCHEDULERS)


@pytest.mark.parametrize("name", lr_scheduler_names())
def test_every_lr_scheduler_name_builds_and_runs_its_schedule(name):
    from lora_offset.training.optimizers import make_lr_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = make_lr_scheduler(TrainingConfig(lr_scheduler=name, lr_warmup_steps=2), optimizer, 10)
    lrs = []
    for _ in range(10):
        optimizer.step()
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    assert all(0 <= lr <= 1.0 for lr in lrs)
    assert len(set(lrs)) == 1 if name == "constant" else len(set(lrs)) > 1  # "constant" has no warm-up


def test_every_diffusers_schedule_is_either_accepted_or_refused_with_a_reason(tmp_path):
    from diffusers.optimization import SchedulerType

    from lora_offset.config import Config
    from lora_offset.errors import UserError
    from lora_offset.training.optimizers import LR_SCHEDULERS, UNSUPPORTED_LR_SCHEDULERS

    assert set(LR_SCHEDULERS) | set(UNSUPPORTED_LR_SCHEDULERS) == {s.value for s in SchedulerType}
    (tmp_path / "img").mkdir()
    for name, why in UNSUPPORTED_LR_SCHEDULERS.items():
        data = {"model": {"pretrained": "x"}, "training": {"lr_scheduler": name},
                "dataset": {"subsets": [{"image_dir": str(tmp_path / "img")}]}}
        with pytest.raises(UserError, match=f"training.lr_scheduler '{name}' needs"):
            Config.from_dict(data, "t.toml")


# ------------------------------------------------------------------------------------------- trackers

@pytest.fixture()
def offline_wandb(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.mark.slow  # "all" starts wandb's service process
def test_every_tracker_name_builds_its_accelerate_trackers(tmp_path, offline_wandb):
    """tensorboard, none and all (tensorboard + wandb) through accelerate as train() builds them;
    "wandb" alone is the wandb half of "all" (checked by name)."""
    from lora_offset.training import trackers
    from lora_offset.training.train import make_accelerator

    for name in accepted(TrainingConfig, "log_with"):
        assert trackers.trackers(name) == trackers.TRACKERS[name]
    for name in ("none", "tensorboard", "all"):
        out = tmp_path / name
        t = TrainingConfig(log_with=name, mixed_precision="no")
        accelerator = make_accelerator(t, out)
        accelerator.init_trackers("lora-offset", init_kwargs=trackers.init_kwargs(name, None, out / "logs"))
        assert sorted(tr.name for tr in accelerator.trackers) == sorted(trackers.TRACKERS[name])
        accelerator.log({"loss": 0.5}, step=1)
        accelerator.end_training()
    assert list((tmp_path / "tensorboard" / "logs").rglob("events.out.tfevents.*"))


def test_a_missing_wandb_stops_train_before_any_work_with_one_line(tmp_path, tiny_model_dir):
    """As if wandb were uninstalled (a sitecustomize makes `import wandb` fail as for a package that
    is not there), in a real `lora-offset train` process: exit 2, one `error:` line naming the pip
    command, no traceback, nothing written."""
    from tests.test_train import make_images, write_config

    blocker = tmp_path / "no-wandb"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    images = make_images(tmp_path / "img", 2)
    config = write_config(tmp_path, tiny_model_dir, images, training={"log_with": "wandb"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lora_offset", "train", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pip install 'lora-offset[wandb]'" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- network types and base precisions

@pytest.mark.parametrize("network_type", accepted(NetworkConfig, "type"))
@pytest.mark.parametrize("preset", accepted(NetworkConfig, "preset"))
def test_every_network_type_and_preset_builds_its_peft_adapter_on_the_unet(tiny_components, network_type, preset):
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    from lora_offset.training import networks

    layer = {"lora": LoraLayer, "loha": LoHaLayer, "lokr": LoKrLayer}[network_type]
    unet = tiny_components["unet"]
    unet_config, _ = networks.network_configs(NetworkConfig(type=network_type, preset=preset, rank=4, alpha=4.0))
    params = networks.add_lora(unet, unet_config)
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    wrapped = [m for m in unet.modules() if isinstance(m, layer)]
    assert len(wrapped) == len(networks.lora_module_names(unet)) > 0


@pytest.mark.parametrize("precision", accepted(ModelConfig, "base_precision"))
def test_every_base_precision_stores_the_unet_and_it_still_runs(tiny_components, precision):
    from lora_offset.training import base_precision

    unet = tiny_components["unet"].requires_grad_(False)
    base_precision.apply(unet, precision, torch.float32)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = unet(sample, torch.tensor([10]), text).sample
    assert out.shape == sample.shape and torch.isfinite(out).all()


# ------------------------------------------------------------------------- the other named choices

@pytest.mark.parametrize("mixed_precision", accepted(TrainingConfig, "mixed_precision"))
def test_every_mixed_precision_builds_an_accelerator(tmp_path, mixed_precision):
    from lora_offset.training.train import make_accelerator

    accelerator = make_accelerator(TrainingConfig(mixed_precision=mixed_precision, log_with="none"), tmp_path)
    # fp16 needs CUDA: on a CPU it falls back to fp32 (with a warning), as train() says.
    expected = "no" if mixed_precision == "fp16" and not torch.cuda.is_available() else mixed_precision
    assert accelerator.mixed_precision == expected


@pytest.mark.parametrize("loss_type", accepted(TrainingConfig, "loss_type"))
@pytest.mark.parametrize("schedule", accepted(TrainingConfig, "huber_schedule"))
def test_every_loss_type_and_huber_schedule_gives_a_finite_loss(loss_type, schedule):
    from lora_offset.training import losses

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    alphas_cumprod = torch.linspace(0.99, 0.01, 1000)
    huber_c = losses.huber_threshold(schedule, 0.1, torch.tensor([10, 900]), alphas_cumprod, 1000)
    loss = losses.per_sample_loss(pred, target, loss_type, huber_c if losses.LOSS_TYPES[loss_type][1] else None)
    assert loss.shape == (2,) and torch.isfinite(loss).all() and (loss > 0).all()


@pytest.mark.parametrize("interpolation", accepted(SubsetConfig, "resize_interpolation"))
def test_every_resize_interpolation_resamples(interpolation):
    from PIL import Image

    from lora_offset.training.data.augment import INTERPOLATIONS, resample

    assert interpolation in INTERPOLATIONS
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    out = resample(image, (16, 16), (0, 0, 40, 30), interpolation)
    assert out.size == (16, 16)


@pytest.mark.parametrize("strategy", accepted(NoiseConfig, "timestep_bias_strategy"))
@pytest.mark.parametrize("distribution", accepted(NoiseConfig, "timestep_distribution"))
def test_every_timestep_distribution_and_bias_strategy_draws_timesteps(distribution, strategy):
    from lora_offset.training.timesteps import BIAS_STRATEGIES, DISTRIBUTIONS, TimestepDistribution, sample_timesteps

    assert set(accepted(NoiseConfig, "timestep_distribution")) == set(DISTRIBUTIONS)
    assert set(accepted(NoiseConfig, "timestep_bias_strategy")) == set(BIAS_STRATEGIES)
    dist = TimestepDistribution(distribution, bias_strategy=strategy, bias_multiplier=3.0, bias_begin=10, bias_end=20)
    drawn = sample_timesteps(dist, 256, 1000, torch.Generator().manual_seed(0), min_timestep=5, max_timestep=900)
    assert drawn.dtype == torch.int64 and drawn.min() >= 5 and drawn.max() < 900 and len(set(drawn.tolist())) > 20


def test_every_section_literal_is_covered_here():
    """A new Literal key in the config must be added to this file (its names must build something)."""
    covered = {("ModelConfig", "base_precision"), ("ModelConfig", "prediction_type"), ("NetworkConfig", "type"),
               ("NetworkConfig", "preset"),
               ("TrainingConfig", "optimizer"), ("TrainingConfig", "log_with"), ("TrainingConfig", "mixed_precision"),
               ("TrainingConfig", "loss_type"), ("TrainingConfig", "huber_schedule"),
               ("TrainingConfig", "save_precision"), ("TrainingConfig", "max_token_length"),
               ("SubsetConfig", "resize_interpolation"), ("NoiseConfig", "timestep_distribution"),
               ("NoiseConfig", "timestep_bias_strategy"), ("TrainingConfig", "ema_save")}
    from lora_offset.config import SECTIONS

    found = set()
    for cls in [*SECTIONS.values(), SubsetConfig]:
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            inner = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is typing.Union \
                else [hint]
            if any(typing.get_origin(h) is typing.Literal for h in inner):
                found.add((cls.__name__, f.name))
    # prediction_type, save_precision and max_token_length are tested where they act (test_train,
    # test_export, test_text): their values are numbers and dtypes, not objects from a library; ema_save's
    # two values write their files in test_ema.
    assert found == covered, f"new Literal keys: {found - covered}; gone: {covered - found}"
