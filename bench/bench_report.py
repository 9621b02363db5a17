"""bench/train_bench.py's report: the environment, ratios against the baseline, the issues' targets, bench.md.

peak_tflops, ratios, targets and markdown are pure functions of their arguments, so tests check them
on made-up numbers; environment() alone reads the machine (device, library versions, date).
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import time

import torch

BASELINE = "naive"

# Dense (no sparsity) tensor-core peak in TFLOP/s for bf16/fp16 inputs with fp32 accumulation (what
# PyTorch's matmuls use), from NVIDIA's datasheets (dense = half the "with sparsity" figure). First
# match wins; MIG slices and unknown devices get no MFU rather than a wrong one.
PEAK_TFLOPS: list[tuple[str, float, str]] = [
    (r"\bMIG\b", 0.0, "MIG slice: a fraction of the GPU, peak unknown"),
    (r"H100.*PCIe", 756.0, "H100 PCIe, dense bf16"),
    (r"H100.*NVL", 835.0, "H100 NVL, dense bf16"),
    (r"GH200|H200", 989.0, "H200 / GH200, dense bf16"),
    (r"H100", 989.0, "H100 SXM, dense bf16"),
    (r"A100", 312.0, "A100, dense bf16"),
    (r"L40S", 362.0, "L40S, dense bf16"),
    (r"RTX 4090", 165.2, "RTX 4090, dense fp16/bf16 with fp32 accumulate (330 is fp16 accumulate)"),
    (r"\bL4\b", 121.0, "L4, dense bf16"),
    (r"\bA10\b", 125.0, "A10, dense bf16"),
]


def peak_tflops(device_name: str) -> tuple[float, str] | None:
    """(dense bf16/fp16 peak TFLOP/s, which entry) for a torch.cuda.get_device_name, or None if unknown."""
    for pattern, value, label in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return (value, label) if value > 0 else None
    return None


def environment(tiny: bool, argv: list[str]) -> dict:
    import accelerate
    import diffusers
    import transformers

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except Exception:  # bitsandbytes is only needed by adamw8bit; report, don't fail
        bnb_version = None
    cuda = torch.cuda.is_available() and not tiny
    if cuda:
        name = torch.cuda.get_device_name()
    else:
        name = (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
                f"{torch.get_num_threads()} torch threads)")
    peak = peak_tflops(name) if cuda else None
    return {
        "device": name,
        "peak_tflops": peak[0] if peak else None,
        "peak_tflops_source": peak[1] if peak else None,
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "accelerate": accelerate.__version__, "bitsandbytes": bnb_version,
        "python": platform.python_version(),
        "command": " ".join(shlex.quote(a) for a in ["python", *argv]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def ratios(results: dict[str, dict]) -> dict:
    """Each profile against the naive baseline: memory (lower is better) and speed (higher is better)."""
    base = results.get(BASELINE)
    out = {}
    for name, r in results.items():
        if name == BASELINE or base is None or "error" in r or "error" in base:
            continue
        div = lambda a, b: r[a] / base[b] if r.get(a) is not None and base.get(b) else None  # noqa: E731
        out[f"{name}/{BASELINE}"] = {
            "peak_allocated": div("peak_allocated_gb", "peak_allocated_gb"),
            "peak_reserved": div("peak_reserved_gb", "peak_reserved_gb"),
            "it_per_s": div("it_per_s", "it_per_s"),
            "images_per_s": div("images_per_s", "images_per_s"),
        }
    return out


def targets(results: dict[str, dict], ratio: dict) -> dict:
    """Issues #7 and #15's targets (set for H100/H200): True/False when measured, None when not measurable here."""
    c, t, nf4 = results.get("consumer", {}), results.get("throughput", {}), results.get("consumer-nf4", {})
    mem_ratio = ratio.get(f"consumer/{BASELINE}", {}).get("peak_allocated")

    def check(value, ok):
        return None if value is None else bool(ok(value))

    return {
        "consumer peak allocated <= 3.5 GB": check(c.get("peak_allocated_gb"), lambda v: v <= 3.5),
        "consumer >= 5 it/s": check(c.get("it_per_s") if c.get("peak_allocated_gb") is not None else None,
                                    lambda v: v >= 5),
        "consumer-nf4 peak allocated <= 1.5 GB": check(nf4.get("peak_allocated_gb"), lambda v: v <= 1.5),
        "throughput MFU >= 35 %": check(t.get("mfu"), lambda v: v >= 0.35),
        "consumer memory <= 0.4 x naive": check(mem_ratio, lambda v: v <= 0.4),
    }


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# Training benchmark ({'--tiny, CPU' if report['tiny'] else 'full-size SD 1.5'})",
        "",
        f"Device: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}, diffusers {env['diffusers']}, "
        f"transformers {env['transformers']}, accelerate {env['accelerate']}, bitsandbytes {env['bitsandbytes']}.",
        (f"Peak for MFU: {env['peak_tflops']} TFLOP/s ({env['peak_tflops_source']})." if env["peak_tflops"]
         else "MFU: not reported (no known dense bf16/fp16 peak for this device)."),
        f"Command: `{env['command']}`  ({env['date_utc']})",
        "",
        "| profile | peak alloc GB | peak reserved GB | it/s | images/s | TFLOP/step | MFU | frozen UNet GB | settings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["profiles"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | | | | |")
            continue
        s = r["settings"]
        settings = (f"batch {s['batch_size']}, {s['resolution']}px, rank {s['rank']}, {s['mixed_precision']} "
                    f"({s['weight_dtype']} compute, base stored {s['base_precision']}), "
                    f"{s['optimizer']}, ckpt {s['gradient_checkpointing']}, latent cache {s['cache_latents']}, "
                    f"text cache {s['cache_text_embeddings']}, compile {s['torch_compile']}, "
                    f"channels_last {s['channels_last']}, tf32 {s['allow_tf32']}, {'/'.join(s['attention'])}")
        lines.append(
            f"| {name} | {_fmt(r['peak_allocated_gb'], '.2f')} | {_fmt(r['peak_reserved_gb'], '.2f')} | "
            f"{_fmt(r['it_per_s'], '.2f')} | {_fmt(r['images_per_s'], '.2f')} | "
            f"{_fmt(r['flops_per_step'], '.3g', 1e-12)} | {_fmt(r['mfu'], '.1%')} | "
            f"{_fmt(r.get('frozen_unet_gb'), '.3f')} | {settings} |")
    lines += ["", "Ratios against naive:", ""]
    for pair, values in report["ratios"].items():
        lines.append(f"- {pair}: " + ", ".join(f"{k} {'n/a' if v is None else format(v, '.2f') + 'x'}"
                                               for k, v in values.items()))
    lines += ["", "Targets (issues #7 and #15, for H100/H200):", ""]
    for target, ok in report["targets"].items():
        lines.append(f"- {target}: {'not measured' if ok is None else ('met' if ok else 'NOT met')}")
    notes = [f"- {name}: {n}" for name, r in report["profiles"].items() for n in r.get("notes", [])]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"
