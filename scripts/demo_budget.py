"""The positive control's learning curve: at which LoRA budget does it learn its instance?

    python scripts/demo_budget.py --out budget-out [--rungs 100 200 300 400]

Trains ONLY the positive-control arm (solid mid-grey instance, standard noise: nothing blocks it)
with the protocol's settings to the largest rung, saving the adapter at every rung (the schedule is
constant after warm-up, so the adapter at step S is what an S-step run ends with), then judges the
instance prompt at each rung with the protocol's sampler and demo_report.judge_control's rule
(flattening toward the instance, brightness, loss flattened). The black-instance arms are never run here: nothing
it prints can depend on their outcome. Protocol v3 chose its budget with it; v4 to v6 fix the budget
(the largest that fits the 10-minute limit) and records this curve as evidence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from lora_offset.experiments import demo, demo_base, demo_jobs, demo_report  # noqa: E402
from lora_offset.quiet import disable_library_progress_bars  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rungs", type=int, nargs="+", default=[100, 200, 300, 400])
    p.add_argument("--weights", default=str(demo_base.ASSETS_DIR / demo_base.WEIGHTS_NAME))
    p.add_argument("--learning-rate", type=float, default=demo.PROTOCOL["learning_rate"])
    p.add_argument("--rank", type=int, default=demo.PROTOCOL["rank"], help="rank = alpha = conv rank = conv alpha")
    args = p.parse_args(argv)
    disable_library_progress_bars()
    out = Path(args.out)
    rungs = sorted(args.rungs)
    protocol = {**demo.PROTOCOL, "max_steps": rungs[-1], "learning_rate": args.learning_rate,
                "rank": args.rank, "alpha": float(args.rank), "conv_rank": args.rank, "conv_alpha": float(args.rank)}
    arms = {"control": demo.ARMS["control"]}
    protocol["arms"] = {"control": {**demo.ARMS["control"], "prompts": [demo.INSTANCE_PROMPT, demo.CLASS_PROMPT]}}
    t0 = time.perf_counter()
    demo_base.expand_to_diffusers(out / "base-model", args.weights)
    demo.write_data(out, protocol, arms)
    demo_jobs.write_json(out / demo_jobs.PROTOCOL_FILE, protocol)
    config = demo.arm_config("control", arms["control"], out, protocol)
    config["training"]["save_every_steps"] = rungs[0] if all(r % rungs[0] == 0 for r in rungs) else 100
    (out / "loras").mkdir(parents=True, exist_ok=True)
    (out / "loras" / "control.toml").write_text(demo.to_toml(config))
    demo_jobs.job_classes(out)
    trained = demo_jobs.job_train(out, "control")
    print(f"trained {rungs[-1]} steps in {trained['seconds']:.0f} s", flush=True)

    components = demo_jobs.load_base(out)
    base = {"control_reference": {"base_spread": demo_jobs.control_check(
        demo_jobs.pipeline(components), components, protocol)["spread"]}}
    rows = []
    for rung in rungs:
        name = "control" if rung == rungs[-1] else f"control-step{rung:06d}"
        adapter = out / "loras" / "control" / f"{name}.safetensors"
        pipe = demo_jobs.pipeline(components)
        pipe.load_lora_weights(str(adapter), adapter_name="arm")
        entry = {"control_check": demo_jobs.control_check(pipe, components, protocol),
                 "loss": demo_report.loss_summary(trained["losses"][:rung], protocol["loss_flat_within"])}
        pipe.unload_lora_weights()
        verdict = demo_report.judge_control(entry, base, protocol)
        rows.append({"steps": rung, "instance_luminance": entry["control_check"]["mean_luminance"],
                     "loss_quarters": entry["loss"]["quarters"], **verdict})
        print(json.dumps(rows[-1]), flush=True)
    chosen = next((r["steps"] for r in rows if r["learned"]), None)
    summary = {"learning_rate": args.learning_rate, "rank": args.rank, "rungs": rows, "first_learned_at": chosen,
               "seconds": time.perf_counter() - t0, "train_seconds": trained["seconds"]}
    demo_jobs.write_json(out / "budget.json", summary)
    print(f"the control first learned its instance at {chosen} steps" if chosen else "no rung passed: the control never learned its instance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
