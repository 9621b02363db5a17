"""Training benchmark: the real `lora-offset train` step on full-size SD 1.5, five profiles, one run.

    python bench/train_bench.py --out bench-results            # CUDA GPU, full-size SD 1.5 at 512x512
    python bench/train_bench.py --tiny --out /tmp/bench-tiny   # CPU, tiny model at 64x64 (CI, < 1 min)

Every profile calls lora_offset.training.train.train (the code path of `lora-offset train`) with a Config and
a random-init base model (lora_offset.sd15.build_sd15: no download) on a synthetic image folder.
Hooks around each optimizer step give the timestamps (CUDA-synchronised), the peak memory, and the
FLOPs of one steady-state step (torch.utils.flop_counter.FlopCounterMode: forward + backward of the
actual step, gradient-checkpoint recomputation included). Writes <out>/bench.json and <out>/bench.md.
See docs/PERFORMANCE.md for the profile definitions and results.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

# bench_report.py sits beside this script; put its folder on the path however the script is loaded
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import environment, markdown, peak_tflops, ratios, targets  # noqa: E402

GB = 1e9  # memory is reported in GB = 10^9 bytes (the unit of the targets in issue #7)

# The run's profiles. Only the keys listed differ; everything else is the project's defaults (rank 32
# everywhere so that the profiles train the same adapter). "gpu_only" keys are dropped by --tiny.
PROFILES: dict[str, dict] = {
    "consumer": {
        "description": "fits a small GPU: fp16, AdamW8bit, gradient checkpointing, cached latents and "
                       "text embeddings (VAE and text encoder moved to CPU after caching), SDPA",
        "batch_size": 1,
        "training": {"mixed_precision": "fp16", "optimizer": "adamw8bit", "gradient_checkpointing": True,
                     "cache_latents": True, "cache_text_embeddings": True, "torch_compile": False,
                     "channels_last": False, "allow_tf32": True},
    },
    # consumer with the frozen UNet stored in fp8 / NF4 (model.base_precision): the same step, less memory.
    "consumer-fp8": {
        "description": "consumer with the frozen UNet stored as float8_e4m3fn (diffusers' layerwise casting), "
                       "computing in fp16",
        "batch_size": 1,
        "model": {"base_precision": "fp8"},
        "training": {},  # filled from consumer below
    },
    "consumer-nf4": {
        "description": "consumer with the frozen UNet stored as bitsandbytes NF4 (QLoRA's 4-bit storage), "
                       "computing in fp16",
        "batch_size": 1,
        "model": {"base_precision": "nf4"},
        "training": {},
    },
    "throughput": {
        "description": "fast on a big GPU: batch 8, bf16, no checkpointing, torch.compile(UNet), channels_last, "
                       "TF32, fused AdamW, cached latents and text embeddings",
        "batch_size": 8,
        "training": {"mixed_precision": "bf16", "optimizer": "adamw", "gradient_checkpointing": False,
                     "cache_latents": True, "cache_text_embeddings": True, "torch_compile": True,
                     "channels_last": True, "allow_tf32": True},
        "gpu_only": {"torch_compile": "inductor compiles for minutes on a CPU; --tiny runs the UNet eagerly"},
    },
    "naive": {
        "description": "baseline: fp32 weights (mixed_precision \"no\"), torch AdamW, no checkpointing, no caches "
                       "(VAE encode and text encoder run every step), no TF32",
        "batch_size": 1,
        "training": {"mixed_precision": "no", "optimizer": "adamw", "gradient_checkpointing": False,
                     "cache_latents": False, "cache_text_embeddings": False, "torch_compile": False,
                     "channels_last": False, "allow_tf32": False},
    },
}
for _name in ("consumer-fp8", "consumer-nf4"):
    PROFILES[_name]["training"] = dict(PROFILES["consumer"]["training"])
RANK, ALPHA = 32, 16.0
CAPTION = "a photo of sks"

# ---------------------------------------------------------------------------------------------------
# Inputs: images, tokenizer, base model, config


def make_image_folder(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """`count` RGB PNGs of `size`^2: smooth colour gradients plus noise (so PNG decode is real work)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    for i in range(count):
        low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        pixels = low + (high - low) * ramp[None, :, None] * ramp[:, None, None]
        pixels = np.clip(pixels + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"bench{i:03d}.png")
    return folder


def write_sd15_shaped_tokenizer(folder: Path) -> Path:
    """A character-level CLIP tokenizer with CLIP ViT-L/14's vocabulary size (49408) and special-token
    ids (<|startoftext|> 49406, <|endoftext|> 49407): the real BPE files are not available offline, and
    the benchmark only needs valid token ids for the full-size text encoder's embedding table."""
    from lora_offset.tiny import write_tiny_tokenizer

    return write_tiny_tokenizer(folder, vocab_size=49408)


def build_base(tiny: bool, dtype: torch.dtype, work_dir: Path, seed: int = 0):
    """A random-init base model on CPU in `dtype`, as models.load_base_model delivers one: full-size SD 1.5
    (UNet 860 M, CLIP ViT-L/14 text encoder 123 M, VAE 84 M parameters), or lora_offset.tiny's."""
    from transformers import CLIPTokenizer

    from lora_offset.training.models import BaseModel
    from lora_offset.tiny import SD15_SCHEDULER_CONFIG, build_tiny_components

    torch.manual_seed(seed)
    if tiny:
        c = build_tiny_components(seed=seed, tokenizer_dir=work_dir / "tokenizer-tiny")
        unet, vae, text_encoder, tokenizer = c["unet"], c["vae"], c["text_encoder"], c["tokenizer"]
    else:
        from lora_offset.sd15 import build_sd15

        unet, vae, text_encoder = (build_sd15(name, device="cpu") for name in ("unet", "vae", "text_encoder"))
        tokenizer = CLIPTokenizer.from_pretrained(str(write_sd15_shaped_tokenizer(work_dir / "tokenizer-sd15")))
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval().to(dtype)
    return BaseModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                     scheduler_config=dict(SD15_SCHEDULER_CONFIG))


def profile_settings(name: str, tiny: bool) -> tuple[dict, list[str]]:
    """(the profile's settings as used in this run, notes on what --tiny changed)."""
    spec = copy.deepcopy(PROFILES[name])
    notes = []
    if tiny:
        for key, why in spec.get("gpu_only", {}).items():
            spec["training"][key] = False
            notes.append(f"training.{key} off: {why}")
    return spec, notes


def profile_config(name: str, spec: dict, image_dir: Path, output_dir: Path, resolution: int, max_steps: int):
    from lora_offset.config import Config

    return Config.from_dict({
        "model": {"pretrained": "random-init SD 1.5 components (bench/train_bench.py)", **spec.get("model", {})},
        "network": {"rank": RANK, "alpha": ALPHA},
        "training": {"output_dir": str(output_dir), "output_name": f"bench-{name}", "max_steps": max_steps,
                     "learning_rate": 1e-4, "seed": 0, "save_precision": "fp16", **spec["training"]},
        "dataset": {"resolution": resolution, "batch_size": spec["batch_size"],
                    "subsets": [{"image_dir": str(image_dir), "class_tokens": CAPTION}]},
    }, source=f"bench profile {name}")


# ---------------------------------------------------------------------------------------------------
# Measurement


def flop_counter():
    """FlopCounterMode (matmul, conv and attention FLOPs), plus formulas for the CPU's fused SDPA kernel,
    which torch's counter has none for (GPU attention kernels are covered by torch itself)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def forward(q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(q, k, v)

        def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_backward_flop_count(grad_out, q, k, v)

        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    gemm_4bit = _bitsandbytes_gemm_4bit()
    if gemm_4bit is not None:
        # bitsandbytes' 4-bit matmul (NF4 Linear4bit forward) is its own op, which torch's counter does not
        # know; its backward is a plain matmul on the dequantized weight and is counted already.
        def gemm_4bit_flops(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs):
            rows = math.prod(a_shape[:-1])
            return 2 * rows * shape_b[0] * shape_b[1]

        mapping[gemm_4bit] = gemm_4bit_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _bitsandbytes_gemm_4bit():
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

        return torch.ops.bitsandbytes.gemm_4bit
    except (ImportError, AttributeError):
        return None


class StepHooks:
    """train()'s hooks: a synchronised timestamp at every step start, peak memory split into set-up
    (model to GPU, caches) and loop, and FLOPs counted around step `flop_step` (not a timed step)."""

    def __init__(self, cuda: bool, flop_step: int):
        self.cuda = cuda
        self.flop_step = flop_step
        self.starts: dict[int, float] = {}
        self.finished: set[int] = set()  # steps whose on_step_end came (non-finite steps get none)
        self.losses: dict[int, float] = {}
        self.setup_peak = (0, 0)
        self.flops: int | None = None
        self._counter = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_start(self, step: int) -> None:
        self._close_counter(count=False)  # a step that never ended (non-finite) leaves it open
        self.starts[step] = self._now()
        if step == 0 and self.cuda:
            self.setup_peak = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()
        if step == self.flop_step:
            self._counter = flop_counter()
            self._counter.__enter__()

    def on_step_end(self, step: int, loss: float) -> None:
        # train() calls this with the step count after the step: the step that ran is step - 1.
        ran = step - 1
        if ran == self.flop_step:
            self._close_counter(count=True)
        self.finished.add(ran)
        self.losses[ran] = loss

    def _close_counter(self, count: bool) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            if count:
                self.flops = int(self._counter.get_total_flops())
            self._counter = None

    def close(self) -> None:
        self._close_counter(count=False)

    def step_times(self, first: int, last: int) -> list[float]:
        """Start-to-start seconds of the finished steps first..last (everything the loop does per step)."""
        return [self.starts[k + 1] - self.starts[k] for k in range(first, last + 1)
                if k in self.finished and k + 1 in self.starts]


def run_profile(name: str, *, tiny: bool, image_dir: Path, work_dir: Path, resolution: int,
                warmup: int, steps: int) -> dict:
    """Train profile `name` for warmup + steps + 1 steps (the last one counts FLOPs) and measure it."""
    from lora_offset.training import base_precision
    from lora_offset.training.train import train

    spec, notes = profile_settings(name, tiny)
    cuda = not tiny
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(spec["training"]["mixed_precision"], torch.float32)
    if tiny and dtype == torch.float16:
        dtype = torch.float32  # what train() does on a CPU: fp16 needs a CUDA GPU
        notes.append("mixed_precision fp16 runs as fp32 on a CPU (train.py's fallback)")
    config = profile_config(name, spec, image_dir, work_dir / name, resolution, max_steps=warmup + steps + 1)
    base = build_base(tiny, dtype, work_dir)
    hooks = StepHooks(cuda=cuda, flop_step=warmup + steps)
    _reset_accelerate()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    allocated_before = torch.cuda.memory_allocated() if cuda else None
    started = time.perf_counter()
    try:
        train(config, base=base, hooks=hooks)
    finally:
        hooks.close()
    total_s = time.perf_counter() - started

    times = hooks.step_times(warmup, warmup + steps - 1)
    step_s = statistics.median(times) if times else None
    batch = spec["batch_size"]
    result = {
        "profile": name,
        "description": spec["description"],
        "settings": {"batch_size": batch, "resolution": resolution, "rank": RANK, "alpha": ALPHA,
                     **spec["training"],
                     "base_precision": spec.get("model", {}).get("base_precision", "auto"),
                     "attention": sorted({type(p).__name__ for p in base.unet.attn_processors.values()}),
                     "weight_dtype": str(dtype).removeprefix("torch.")},
        # the frozen UNet as train() stored it (base_precision), LoRA excluded
        "frozen_unet_gb": base_precision.frozen_bytes(base.unet) / GB,
        "notes": notes,
        "warmup_steps": warmup,
        "timed_steps": len(times),
        "skipped_steps": sum(1 for k in range(warmup + steps + 1) if k in hooks.starts and k not in hooks.finished),
        "step_time_median_s": step_s,
        "step_time_min_s": min(times) if times else None,
        "step_time_max_s": max(times) if times else None,
        "it_per_s": 1.0 / step_s if step_s else None,
        "images_per_s": batch / step_s if step_s else None,
        "flops_per_step": hooks.flops,
        "tflops_per_s": hooks.flops / step_s / 1e12 if hooks.flops and step_s else None,
        "setup_s": hooks.starts[0] - started if 0 in hooks.starts else None,
        "first_step_s": hooks.starts[1] - hooks.starts[0] if 1 in hooks.starts else None,
        "total_s": total_s,
        "final_loss": hooks.losses.get(max(hooks.losses)) if hooks.losses else None,
        "peak_allocated_gb": None, "peak_reserved_gb": None,
        "setup_peak_allocated_gb": None, "loop_peak_allocated_gb": None, "loop_peak_reserved_gb": None,
        "allocated_before_gb": None, "mfu": None,
    }
    if cuda:
        loop_alloc, loop_res = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        result.update({
            "peak_allocated_gb": max(hooks.setup_peak[0], loop_alloc) / GB,
            "peak_reserved_gb": max(hooks.setup_peak[1], loop_res) / GB,
            "setup_peak_allocated_gb": hooks.setup_peak[0] / GB,
            "loop_peak_allocated_gb": loop_alloc / GB,
            "loop_peak_reserved_gb": loop_res / GB,
            "allocated_before_gb": allocated_before / GB,
        })
        peak = peak_tflops(torch.cuda.get_device_name())
        if peak and result["tflops_per_s"] is not None:
            result["mfu"] = result["tflops_per_s"] / peak[0]
    del base
    _release()
    return result


def _reset_accelerate() -> None:
    # train() builds an Accelerator per call; accelerate keeps one process-wide state and refuses a new
    # mixed_precision in the same process. Each profile is a fresh training run, so start it fresh.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _release() -> None:
    # torch.compile's caches hold the compiled UNet (and its weights): drop them between profiles.
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for bench.json and bench.md (and the runs' outputs)")
    p.add_argument("--tiny", action="store_true", help="CPU harness: tiny model, 64x64 images, few steps")
    p.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated subset of " + ",".join(PROFILES))
    p.add_argument("--warmup", type=int, help="untimed steps first (default 10 on GPU, 2 with --tiny)")
    p.add_argument("--steps", type=int, help="timed steps, median reported (default 30 on GPU, 3 with --tiny)")
    p.add_argument("--resolution", type=int, help="image size (default 512, 64 with --tiny)")
    p.add_argument("--images", type=int, default=16, help="synthetic images in the dataset (default 16)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each profile in its own process (default: on for GPU runs, off with --tiny)")
    p.add_argument("--child-result", help=argparse.SUPPRESS)  # internal: --isolate's per-profile process
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 10)
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 30)
    args.resolution = args.resolution or (64 if args.tiny else 512)
    args.isolate = (not args.tiny) if args.isolate is None else args.isolate
    args.profiles = [n.strip() for n in args.profiles.split(",") if n.strip()]
    unknown = [n for n in args.profiles if n not in PROFILES]
    if unknown:
        p.error(f"unknown profile {unknown[0]!r}: choose from {', '.join(PROFILES)}")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    return args


def _run_isolated(name: str, argv: list[str], out: Path) -> dict:
    result_file = out / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--profiles", name, "--no-isolate",
           "--child-result", str(result_file)]
    proc = subprocess.run(cmd)
    if proc.returncode != 0 or not result_file.is_file():
        return {"profile": name, "error": f"profile process exited with {proc.returncode}"}
    return json.loads(result_file.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA GPU here; the full-size benchmark needs one (use --tiny for the CPU harness)",
              file=sys.stderr)
        return 2
    if args.tiny:
        torch.set_num_threads(1)  # CI's shared cores: one thread is fastest for tiny models
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image_dir = out / "data" / f"images-{args.resolution}px-{args.images}"
    if args.child_result is None and not image_dir.is_dir():
        make_image_folder(image_dir, args.images, args.resolution)

    results: dict[str, dict] = {}
    for name in args.profiles:
        if args.isolate:
            results[name] = _run_isolated(name, argv, out)
            continue
        try:
            with tempfile.TemporaryDirectory(prefix=f"bench-{name}-", dir=out) as work:
                results[name] = run_profile(name, tiny=args.tiny, image_dir=image_dir, work_dir=Path(work),
                                            resolution=args.resolution, warmup=args.warmup, steps=args.steps)
        except Exception as e:  # one profile failing (say, out of memory) must not lose the others' numbers
            traceback.print_exc()
            _release()
            first_line = (str(e).splitlines() or [""])[0]
            results[name] = {"profile": name, "error": f"{type(e).__name__}: {first_line}"}
        print(f"{name}: " + json.dumps({k: results[name].get(k) for k in
                                        ("it_per_s", "images_per_s", "peak_allocated_gb", "mfu", "error")
                                        if k in results[name]}), flush=True)
    if args.child_result:
        Path(args.child_result).write_text(json.dumps(results[args.profiles[0]]), encoding="utf-8")
        return 0

    ratio = ratios(results)
    report = {"tiny": args.tiny, "environment": environment(args.tiny, ["bench/train_bench.py", *argv]),
              "profiles": results, "ratios": ratio, "targets": targets(results, ratio)}
    from lora_offset.fileio import atomic_write_text

    atomic_write_text(out / "bench.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "bench.md", markdown(report))
    print(markdown(report))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
