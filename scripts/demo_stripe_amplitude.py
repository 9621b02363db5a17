"""Phase-free check of the demo's positive control: do "a photo of sks" samples carry stripes at all?

    python scripts/demo_stripe_amplitude.py BUDGET_OUT [ADAPTER_NAME ...]     (e.g. base control-step000400 control)

BUDGET_OUT is a scripts/demo_budget.py output folder (its base-model/ and loras/control/*.safetensors).
For each adapter ("base": none), 32 samples at the protocol's seeds and sampler; per sample, the
amplitude of the 4-cycles-per-picture component (the instance's stripe period, 32 px) of the column
and of the row luminance profile, the larger of the two, relative to the same amplitude of the VAE's
reconstruction of the instance. Any phase, either orientation: 1 = the instance's stripes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lora_offset.experiments import demo, demo_jobs  # noqa: E402


def stripe_amplitude(luminance: np.ndarray, cycles: int) -> np.ndarray:
    """(N,) amplitude of `cycles` cycles per picture in the column or row profile of (N, H, W) luminance."""
    columns = np.abs(np.fft.rfft(luminance.mean(axis=1) - luminance.mean(axis=(1, 2))[:, None], axis=-1))[:, cycles]
    rows = np.abs(np.fft.rfft(luminance.mean(axis=2) - luminance.mean(axis=(1, 2))[:, None], axis=-1))[:, cycles]
    return np.maximum(columns, rows)


def main(argv=None) -> int:
    out, *names = argv if argv is not None else sys.argv[1:]
    torch.set_num_threads(1)
    demo.quiet_libraries()
    out = Path(out)
    p = dict(demo.PROTOCOL)
    cycles = p["resolution"] // demo.STRIPE_PERIOD
    components = demo_jobs.load_base(out)
    template = demo_jobs.control_template(components, p)["luminance"]
    reference = stripe_amplitude(template[None], cycles)[0]
    for name in names or ["base", "control"]:
        pipe = demo_jobs.pipeline(components)
        if name != "base":
            pipe.load_lora_weights(str(out / "loras" / "control" / f"{name}.safetensors"), adapter_name="check")
        luminance = demo_jobs.luminance_of_pixels(demo_jobs.sample(pipe, p["instance_prompt"], p))
        if name != "base":
            pipe.unload_lora_weights()
        share = stripe_amplitude(luminance, cycles) / reference
        print(f"{name}: stripe amplitude / the instance's: mean {share.mean():.3f}, "
              f"samples >= 0.5: {int((share >= 0.5).sum())} of {len(share)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
