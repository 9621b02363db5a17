"""CPU memory of SD 1.5's frozen UNet and of one LoRA training step, per `model.base_precision`.

    python bench/base_memory_cpu.py --out /tmp/base-memory          # auto (fp32), fp16, fp8, nf4; ~10 min
    python bench/base_memory_cpu.py --out /tmp/x --precisions fp16,nf4 --steps 1

Full-size SD 1.5 UNet (859.5 M parameters) built from the shipped config (lora_offset/sd15, random weights,
no download), with the project's UNet LoRA (rank 32, alpha 16: 192 attention modules), stored by
`lora_offset.training.base_precision.apply` as training would store it on this machine. On a CPU the math runs in
fp32 (train.py trains in fp32 when mixed_precision = "fp16" finds no CUDA GPU), so the precision is the
storage alone. One training step as the consumer profile takes it: batch 1, 512x512 (64x64 latents),
gradient checkpointing, AdamW8bit, forward + MSE loss + backward + optimizer step.

Each precision runs in its own fresh process, one after another, so that one configuration's memory
cannot carry into the next (and the machine's RAM is never asked for two at once). Measured per process:

- `frozen_bytes`: bytes of the UNet's frozen weights as stored (lora_offset.training.base_precision.frozen_bytes:
  parameters that do not train, buffers, NF4 statistics), the number the issue's targets are about.
- `rss_libraries`: resident memory after importing torch/diffusers/bitsandbytes, before the model.
- `rss_frozen_base`: resident memory with the stored UNet and its LoRA, after the full-precision build
  was freed and glibc trimmed (malloc_trim), minus nothing: subtract `rss_libraries` for the model's share.
- `peak_rss_step`: the process's peak resident memory (VmHWM) during the training step, reset just before
  it (/proc/self/clear_refs), so the build's fp32 peak is not in it.
Writes <out>/base_memory.json and <out>/base_memory.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

GB = 1e9
DEFAULT_PRECISIONS = ("auto", "fp16", "fp8", "nf4")
RANK, ALPHA = 32, 16.0


def proc_status_kb(field: str) -> int:
    """A `VmRSS` / `VmHWM` value of this process, in kB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return proc_status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return proc_status_kb("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so RSS shows what is alive
    except OSError:
        pass


def measure(precision: str, steps: int, resolution: int, checkpointing: bool = True, seed: int = 0) -> dict:
    """One configuration, in this process: build, store, train `steps` steps; memory and time."""
    import torch

    from lora_offset.training import base_precision
    from lora_offset.training import networks as lora
    from lora_offset.sd15 import build_sd15

    import bitsandbytes as bnb  # noqa: F401  (imported before the baseline so its libraries count there)
    import diffusers  # noqa: F401

    compute = torch.float32  # the CPU's training dtype (train.py: fp16 falls back to fp32 without CUDA)
    release_freed_memory()
    rss_libraries = rss_bytes()

    torch.manual_seed(seed)
    started = time.perf_counter()
    unet = build_sd15("unet", device="cpu").requires_grad_(False)
    params = lora.add_lora(unet, lora.unet_lora_config(RANK, ALPHA))
    base_precision.apply(unet, precision, compute)
    build_s = time.perf_counter() - started
    release_freed_memory()
    frozen = base_precision.frozen_bytes(unet)
    lora_bytes = sum(p.numel() * p.element_size() for p in params)
    rss_frozen_base = rss_bytes()

    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=1e-2)
    side = resolution // 8
    generator = torch.Generator().manual_seed(seed + 1)
    reset_peak_rss()
    step_times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        latents = torch.randn(1, 4, side, side, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (1,), generator=generator)
        cond = torch.randn(1, 77, 768, generator=generator)
        noisy = latents + noise  # the schedule's scaling does not change the memory
        pred = unet(noisy.to(compute), timesteps, cond.to(compute)).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak_step = peak_rss_bytes()
    return {
        "precision": precision,
        "storage": {"auto": "float32 (the CPU's training dtype)"}.get(
            precision, str(base_precision.STORAGE_DTYPES.get(precision, "nf4")).removeprefix("torch.")),
        "compute_dtype": "float32",
        "unet_parameters": sum(p.numel() for p in build_sd15("unet", "meta").parameters()),
        "lora_parameters": sum(p.numel() for p in params),
        "frozen_bytes": frozen,
        "lora_bytes": lora_bytes,
        "rss_libraries": rss_libraries,
        "rss_frozen_base": rss_frozen_base,
        "peak_rss_step": peak_step,
        "peak_rss_step_above_base": peak_step - rss_frozen_base,
        "build_and_store_s": build_s,
        "step_s": step_times,
        "loss": losses,
        "torch_threads": torch.get_num_threads(),
        "gradient_checkpointing": checkpointing,
    }


def environment(argv: list[str]) -> dict:
    import accelerate
    import bitsandbytes
    import diffusers
    import peft
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:")))
    return {
        "device": f"CPU: {cpu}, {os.cpu_count()} logical cores, {mem_kb / 1e6:.1f} GB RAM",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "accelerate": accelerate.__version__,
        "python": platform.python_version(), "kernel": platform.release(),
        "command": " ".join(shlex.quote(a) for a in ["python", *argv]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_at_start": os.getloadavg(),
    }


def markdown(report: dict) -> str:
    env, rows = report["environment"], report["results"]
    s = report["settings"]
    lines = [
        "# SD 1.5 UNet on CPU: frozen-base memory per base_precision (measured)",
        "",
        f"{env['device']}; torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}, "
        f"bitsandbytes {env['bitsandbytes']}, Python {env['python']}; {env['date_utc']}.",
        f"Settings: UNet LoRA rank {s['rank']} / alpha {s['alpha']}, batch 1, {s['resolution']}x{s['resolution']}, "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, AdamW8bit, compute in fp32, {s['steps']} step(s), {s['threads']} torch thread(s), "
        "one process per precision, glibc malloc "
        + (f"with MALLOC_MMAP_THRESHOLD_={s['malloc_mmap_threshold']}." if s.get("malloc_mmap_threshold")
           else "with its default (dynamic) mmap threshold."),
        f"Command: `{env['command']}`",
        "",
        "| base_precision | stored as | frozen UNet bytes (GB) | vs fp16 | RSS, frozen base (GB) | "
        "RSS, libraries only (GB) | peak RSS, training step (GB) | step (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fp16 = next((r["frozen_bytes"] for r in rows if r.get("precision") == "fp16" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['precision']} | error: {r['error']} | | | | | | |")
            continue
        ratio = f"{r['frozen_bytes'] / fp16:.3f}x" if fp16 else "n/a"
        lines.append(f"| {r['precision']} | {r['storage']} | {r['frozen_bytes'] / GB:.3f} | {ratio} | "
                     f"{r['rss_frozen_base'] / GB:.2f} | {r['rss_libraries'] / GB:.2f} | "
                     f"{r['peak_rss_step'] / GB:.2f} | {max(r['step_s']):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description="CPU memory of SD 1.5's frozen UNet and one LoRA step per base_precision")
    p.add_argument("--out", type=Path, help="folder for base_memory.json and base_memory.md")
    p.add_argument("--precisions", default=",".join(DEFAULT_PRECISIONS))
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine may be shared)")
    p.add_argument("--mmap-threshold", type=int, metavar="BYTES",
                   help="set glibc's MALLOC_MMAP_THRESHOLD_ in the measuring processes: allocations above it are "
                        "mmapped and go back to the OS when freed, so RSS tracks live tensors instead of also "
                        "holding glibc's cache (default: glibc's own, dynamic threshold)")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing in the training step (default: on, as the consumer profile)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: measure this precision, print JSON
    args = p.parse_args(argv)

    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(measure(args.one, args.steps, args.resolution, args.checkpointing)), flush=True)
        return 0

    if args.out is None:
        p.error("--out is required")
    from lora_offset.training.base_precision import PRECISIONS

    precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    unknown = [x for x in precisions if x not in PRECISIONS]
    if unknown:
        p.error(f"unknown precision(s) {unknown}: choose from {', '.join(PRECISIONS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment([Path(sys.argv[0]).as_posix() if not argv else "bench/base_memory_cpu.py",
                                          *argv]),
              "settings": {"rank": RANK, "alpha": ALPHA, "resolution": args.resolution, "steps": args.steps,
                           "threads": args.threads, "batch_size": 1, "gradient_checkpointing": args.checkpointing,
                           "optimizer": "AdamW8bit", "compute_dtype": "float32",
                           "malloc_mmap_threshold": args.mmap_threshold},
              "results": []}
    for precision in precisions:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", precision, "--steps", str(args.steps),
               "--resolution", str(args.resolution), "--threads", str(args.threads),
               "--checkpointing" if args.checkpointing else "--no-checkpointing"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        if args.mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        print(f"{precision}: measuring in a fresh process ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            report["results"].append({"precision": precision, "error": tail})
        else:
            report["results"].append(json.loads(line[len("RESULT "):]))
        print(json.dumps(report["results"][-1], indent=None)[:400], flush=True)
        (args.out / "base_memory.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (args.out / "base_memory.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
