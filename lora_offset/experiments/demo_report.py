"""The demo's report: collect the jobs' JSON files, judge the gates, the control and the prediction, write it up.

Every verdict is a fixed rule from the protocol (demo.PROTOCOL) applied to measured numbers; the
rules are written next to each verdict in report.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RESPONSE_PLOT = "first-step-response.png"


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _stats(eval_report: dict, prompt: str, setting: str | None = None) -> dict:
    settings = eval_report["settings"]
    entry = settings[setting] if setting else next(iter(settings.values()))
    s = entry["prompts"][prompt]
    keys = ("mean_luminance", "std_luminance", "mean_luminance_unclamped", "within_image_std", "frac_below_0_05", "grid")
    return {k: s[k] for k in keys if k in s}


def loss_summary(losses: list[float], within: float) -> dict:
    """Mean loss per quarter of the run; 'flattened' when the last quarter is within `within` (relative)
    of the third."""
    quarters = [float(np.mean(q)) for q in np.array_split(np.asarray(losses, dtype=np.float64), 4)] if len(losses) >= 4 else []
    flat = bool(quarters) and abs(quarters[3] - quarters[2]) <= within * quarters[2]
    return {"quarters": quarters, "flattened": flat, "steps": len(losses)}


def build_report(out: Path, p: dict, timings: dict, base_record: dict, cpu: dict | None = None) -> dict:
    gates = _read(out / "gates.json")
    inst, cls = p["instance_prompt"], p["class_prompt"]
    base_plain = gates["eval"]["plain"]
    base = {"instance_prompt": _stats(base_plain, inst, "base"), "class_prompt": _stats(base_plain, cls, "base"),
            "leak_mean_luminance": {f: _stats(r, inst, "base")["mean_luminance"] for f, r in gates["eval"]["leak"].items()},
            "first_step": gates["first_step"], "control_reference": gates.get("control_reference", {})}
    base["mean_luminance"] = base["class_prompt"]["mean_luminance"]  # the old report's shape
    conditions, ranges = {}, {}
    for arm, arm_cfg in p["arms"].items():
        result = _read(out / "eval" / arm / "result.json")
        training = _read(out / "loras" / arm / "losses.json")
        entry = {"adapter": result["adapter"], "instance": arm_cfg["instance"],
                 "offset": p["offset"] if arm_cfg["offset"] == "protocol" else arm_cfg["offset"],
                 "loss": loss_summary(training["losses"], p["loss_flat_within"]),
                 "train_seconds": round(training["seconds"], 1)}
        if arm_cfg["instance"] == "world":
            entry["prompts"] = {q: _stats(result["plain"], q) for q in arm_cfg["prompts"]}
            ranges[arm] = entry
            continue
        entry.update(_stats(result["plain"], inst))
        entry["class_prompt"] = _stats(result["plain"], cls)
        entry["prompt_contrast"] = entry["class_prompt"]["mean_luminance"] - entry["mean_luminance"]
        if "control_check" in result:
            entry["control_check"] = result["control_check"]
        if "leak" in result:
            entry["leak_mean_luminance"] = {f: _stats(r, inst)["mean_luminance"] for f, r in result["leak"].items()}
            entry["first_step"] = result["first_step"]
        conditions[arm] = entry

    report = {
        "quick": bool(p.get("quick")),
        "instance_prompt": inst, "class_prompt": cls, "resolution": p["resolution"],
        "base_model": str(out / "base-model"),
        "base": base,
        "gates": {k: {"value": v["value"], "pass": v["pass"], "rule": v["rule"]} for k, v in gates["gates"].items()},
        "sd15_match": gates["sd15_match"],
        "conditions": conditions,
        "protocol": {k: v for k, v in p.items() if k != "arms"},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "cpu_s": {k: round(v, 1) for k, v in (cpu or {}).items()},  # each job's own CPU time
        "base_record": {k: base_record.get(k) for k in ("unet_steps_done", "unet_loss_last_100", "scaling_factor",
                                                          "vae_checks", "latent_amplitude")},
    }
    if ranges:
        report["brightness_range"] = ranges
    report["control"] = judge_control(conditions.get("control"), base, p)
    report["prediction"] = judge_prediction(conditions, base, p)
    report["claim"] = claim_sentence(report)
    write_response_plot(out / RESPONSE_PLOT, base, conditions)
    report["response_plot"] = RESPONSE_PLOT
    return report


def judge_control(control: dict | None, base: dict, p: dict) -> dict:
    """The positive control learned its instance (solid mid-grey): its samples have moved at least
    `min_flattening` of the way from the base's within-image spread to the VAE's reconstruction's, at
    the instance's brightness, and its loss has flattened."""
    if control is None or "control_check" not in control:
        return {"learned": False, "reason": "no control arm"}
    rule, check = p["control"], control["control_check"]
    error = abs(check["mean_luminance"] - check["template_mean_luminance"])
    base_spread = base.get("control_reference", {}).get("base_spread")
    room = None if base_spread is None else base_spread - check["template_spread"]
    # No room (the base already as flat as the VAE's picture of the instance): nothing to learn, no pass.
    flattening = (base_spread - check["spread"]) / room if room is not None and room > 0 else None
    learned = (flattening is not None and flattening >= rule["min_flattening"] and error <= rule["max_error"]
               and control["loss"]["flattened"])
    return {"learned": bool(learned), "flattening": flattening, "spread": check["spread"], "base_spread": base_spread,
            "template_spread": check["template_spread"], "luminance_error": error,
            "loss_flattened": control["loss"]["flattened"],
            "rule": (f"\"{p['instance_prompt']}\" samples' within-image luminance spread moves >= "
                     f"{rule['min_flattening']} of the way from the base's to that of the VAE's reconstruction of the "
                     f"solid grey instance (1 = all the way), their mean luminance is within {rule['max_error']} of the "
                     f"reconstruction's, and the loss's last quarter is within {p['loss_flat_within']:.0%} of its third")}


def judge_prediction(conditions: dict, base: dict, p: dict) -> dict:
    """The prediction fixed in advance (issue 10), item by item."""
    rule = p["prediction"]
    std, off = conditions.get("standard"), conditions.get("offset")
    if std is None or off is None:
        return {"held": False, "items": {}}
    x0 = lambda arm: next(r["x0_luminance"] for r in arm["first_step"] if r["fraction"] == 0.0)  # noqa: E731
    base_class = base["class_prompt"]["mean_luminance"]
    items = {
        "offset_instance_dark": {"value": off["mean_luminance"], "pass": off["mean_luminance"] <= rule["offset_max"],
                                 "rule": f"offset arm, instance prompt <= {rule['offset_max']}"},
        "standard_instance_gray": {"value": std["mean_luminance"], "pass": std["mean_luminance"] >= rule["standard_min"],
                                   "rule": f"standard arm, instance prompt >= {rule['standard_min']}"},
    }
    for name, arm in (("standard", std), ("offset", off)):
        gap = arm["class_prompt"]["mean_luminance"] - base_class
        items[f"{name}_class_kept"] = {"value": gap, "pass": abs(gap) <= rule["class_within"],
                                       "rule": f"{name} arm, class prompt within {rule['class_within']} of the base's"}
    items["standard_first_step_gray"] = {"value": x0(std), "pass": x0(std) >= rule["x0_gray_min"],
                                         "rule": f"standard arm, first-step x0 from plain noise >= {rule['x0_gray_min']}"}
    items["offset_first_step_dark"] = {"value": x0(off), "pass": x0(off) <= rule["x0_dark_max"],
                                       "rule": f"offset arm, first-step x0 from plain noise <= {rule['x0_dark_max']}"}
    for item in items.values():
        item["pass"] = bool(item["pass"])
    return {"held": all(i["pass"] for i in items.values()), "items": items}


def claim_sentence(r: dict) -> str:
    """One plain sentence on Guttenberg's claim: DreamBooth on black stays grey with standard noise and
    reaches black with offset noise."""
    if r["quick"]:
        return "This was a --quick pipeline check: it says nothing about the claim."
    items = r["prediction"]["items"]
    if not r["control"]["learned"]:
        return ("Not tested: the positive control did not learn its instance with this LoRA budget, so a null "
                "result would mean nothing.")
    if not items:
        return "Not tested: the standard and offset arms did not both run."
    dark, gray = items["offset_instance_dark"], items["standard_instance_gray"]
    kept = items["standard_class_kept"]["pass"] and items["offset_class_kept"]["pass"]
    if dark["pass"] and gray["pass"]:
        return (f"The seed's claim reproduced: with standard noise the black instance stayed at {gray['value']:.2f}, "
                f"with offset noise it reached {dark['value']:.2f}" + ("." if kept else
                "; but the class prompt moved more than the protocol allows (see the prediction table)."))
    return (f"The seed's claim did not reproduce as predicted: instance prompt {gray['value']:.2f} with standard "
            f"noise and {dark['value']:.2f} with offset noise (predicted >= {r['protocol']['prediction']['standard_min']} "
            f"and <= {r['protocol']['prediction']['offset_max']}).")


def write_response_plot(path: Path, base: dict, conditions: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora_offset.experiments.brightness_report import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    lines = [("base", base.get("first_step"))] + [(k, v.get("first_step")) for k, v in conditions.items()]
    for name, rows in lines:
        if rows:
            ax.plot([r["fraction"] for r in rows], [r["x0_luminance"] for r in rows], marker="o", label=name)
    ax.set_xlabel("x_T channel mean, as a fraction of the black instance's leak (0 = pure noise)")
    ax.set_ylabel("luminance of the first step's x0 prediction")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# report.md


def _ms(s: dict) -> str:
    return f"{s['mean_luminance']:.3f} ± {s['std_luminance']:.3f}"


def _ok(flag: bool) -> str:
    return "pass" if flag else "**FAIL**"


def summary_lines(r: dict) -> list[str]:
    lines = [r["claim"]]
    for name, s in r["conditions"].items():
        lines.append(f"  {name:9s} \"{r['instance_prompt']}\" {_ms(s)}   \"{r['class_prompt']}\" {_ms(s['class_prompt'])}")
    lines.append("  gates: " + ", ".join(f"{k} {'pass' if v['pass'] else 'FAIL'}" for k, v in r["gates"].items()))
    lines.append(f"  positive control learned: {r['control']['learned']}; prediction held: {r['prediction']['held']}")
    return lines


def render_report(r: dict) -> str:
    p, b, z = r["protocol"], r["base"], r["sd15_match"]
    inst, cls = r["instance_prompt"], r["class_prompt"]
    lines = ["# lora-offset demo: solid-black DreamBooth on a scale model of SD 1.5", ""]
    if r["quick"]:
        lines += ["**--quick run: a pipeline check with a handful of steps and images; its numbers mean nothing.**", ""]
    lines += [f"**{r['claim']}**", ""]
    lines += [
        "## The scale model matches SD 1.5's numbers", "",
        f"At the first sampling step (√ᾱ = {z['first_sampling_step_sqrt_alpha_bar']:.3f}) the darkest training pictures' "
        f"leak sits z = {z['z_standard']:.1f} noise spreads from pure noise ({z['latent_pixels_per_channel']} latent "
        f"pixels per channel; SD 1.5 at 512²: z ≈ {z['sd15']['z_standard']:.1f}); a solid black image's, "
        f"z = {z['z_standard_solid_black']:.1f}. With offset noise {z['offset']:g}: z = {z['z_offset']:.2f} "
        f"(SD 1.5 with 0.1: {z['sd15']['z_offset']:.2f}). Offset {z['offset']:g} here corresponds to SD 1.5's 0.1 "
        "because the latents are 4× SD's amplitude on a latent with 16× fewer pixels: the leak and the noise's "
        "channel-mean spread both grow 4×, so the offset must too.", "",
        "## Gates (base model, measured before any LoRA result)", "",
        "| gate | value | rule | verdict |", "|---|---|---|---|",
    ]
    for name, g in r["gates"].items():
        lines.append(f"| {name} | `{json.dumps(g['value'], separators=(', ', ': '))[:160]}` | {g['rule']} | {_ok(g['pass'])} |")
    lines += [
        "", "## Arms (same LoRA budget, seeds and sampler)", "",
        f"LoRA rank {p['rank']} / alpha {p['alpha']:g} + conv {p['conv_rank']} / {p['conv_alpha']:g}, {p['max_steps']} steps, "
        f"lr {p['learning_rate']:g}, batch {p['batch_size']} instance + {p['batch_size']} class images, class-caption "
        f"dropout {p['class_caption_dropout']:g}. Eval: {p['eval_n']} images per prompt, seeds {p['eval_seed']}–"
        f"{p['eval_seed'] + p['eval_n'] - 1}, DDIM {p['eval_steps']} steps, guidance {p['guidance_scale']:g}. "
        "Mean luminance ± spread across images (Rec. 709; 0 is black)."
        + (f" Why {p['max_steps']} steps: {p['budget_reason']}." if p.get("budget_reason") else ""), "",
        f"| arm | \"{inst}\" | \"{cls}\" | contrast (class − instance) | leak start ×1 | ×0.5 | first-step x̂₀ | loss flattened |",
        "|---|---|---|---|---|---|---|---|",
    ]
    x0 = lambda rows: next((f"{q['x0_luminance']:.3f}" for q in rows or [] if q["fraction"] == 0.0), "—")  # noqa: E731
    leak = lambda e, f: f"{e['leak_mean_luminance'][f]:.3f}" if "leak_mean_luminance" in e else "—"  # noqa: E731
    lines.append(f"| base | {_ms(b['instance_prompt'])} | {_ms(b['class_prompt'])} | "
                 f"{b['class_prompt']['mean_luminance'] - b['instance_prompt']['mean_luminance']:+.3f} | "
                 f"{leak(b, '1.0')} | {leak(b, '0.5')} | {x0(b['first_step'])} | — |")
    for name, s in r["conditions"].items():
        lines.append(f"| {name} (instance {s['instance']}, offset {s['offset']:g}) | **{_ms(s)}** | {_ms(s['class_prompt'])} | "
                     f"{s['prompt_contrast']:+.3f} | {leak(s, '1.0')} | {leak(s, '0.5')} | {x0(s.get('first_step'))} | "
                     f"{s['loss']['flattened']} |")
    c = r["control"]
    num = lambda key: "n/a" if c.get(key) is None else f"{c[key]:.3f}"  # noqa: E731  (0.0 is a value)
    lines += ["", f"**Positive control** (solid mid-grey instance, standard noise): learned = **{c['learned']}** "
                  f"(flattening {num('flattening')}: within-image spread {num('spread')}, the base's {num('base_spread')}, "
                  f"the VAE's picture of the instance {num('template_spread')}; luminance error {num('luminance_error')}; "
                  f"loss flattened {c.get('loss_flattened')}; rule: {c.get('rule', c.get('reason', ''))}).",
              "", "## The prediction, fixed in advance", "", "| item | value | rule | verdict |", "|---|---|---|---|"]
    for name, item in r["prediction"]["items"].items():
        lines.append(f"| {name} | {item['value']:+.3f} | {item['rule']} | {_ok(item['pass'])} |")
    lines += ["", f"Prediction held: **{r['prediction']['held']}**.", "",
              f"![first-step response]({r['response_plot']})", "",
              "How to read the diagnostics: a standard-noise LoRA that learned black but cannot reach it from pure noise "
              "is darker than the base from the leak starts and grey from plain noise; its first-step x̂₀ from plain "
              "noise stays grey (steep line, grey intercept). An offset-noise LoRA sets the mean itself: flat line, "
              "dark intercept. If even the leak starts stay grey, the LoRA did not learn the instance.", ""]
    if "brightness_range" in r:
        gb = r["gates"].get("b_guttenberg_symptom", {}).get("value", {})
        lines += ["## Brightness range (--full): a LoRA on the base's own captioned pictures", "",
                  "| arm | " + " | ".join(f"\"{q}\"" for q in next(iter(r["brightness_range"].values()))["prompts"]) + " |",
                  "|---|---|---|"]
        lines.append("| base (its training pictures) | " + " | ".join(
            f"{v['samples']:.3f} ({v['data']:.3f})" for v in gb.values()) + " |")
        for name, s in r["brightness_range"].items():
            lines.append(f"| {name} (offset {s['offset']:g}) | " + " | ".join(_ms(v) for v in s["prompts"].values()) + " |")
        lines.append("")
    lines += ["## Images", ""]
    lines.append(f"- base: [\"{inst}\"](eval/base/plain/{b['instance_prompt']['grid']}), "
                 f"[\"{cls}\"](eval/base/plain/{b['class_prompt']['grid']})")
    for name, s in r["conditions"].items():
        lines.append(f"- {name}: ![{name}](eval/{name}/plain/{s['grid']}) "
                     f"[\"{cls}\"](eval/{name}/plain/{s['class_prompt']['grid']})")
    lines += ["", "Time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["timings_s"].items()), ""]
    if r.get("cpu_s"):
        lines += ["CPU time of each job (s; one thread each): " + ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_s"].items()), ""]
    return "\n".join(lines)
