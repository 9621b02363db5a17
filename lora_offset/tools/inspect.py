"""`lora-offset inspect FILE [--json]`: what is in an SD 1.x LoRA file and which loaders would use it.

Reads the safetensors header (key names, shapes, dtypes, metadata) and only the tiny `.alpha`
tensors, without torch (lora_offset.formats.reader.read_header), so it is fast on any file (the
SD 1.5 module names the loader verdicts need come from a cache after the first run:
lora_offset.formats.loaders.sd15_model_names). Understands kohya files (`lora_unet_`, `lora_te_`,
`lora_te1_`, LDM-style names), diffusers/PEFT dotted files (`unet.…lora_A.weight`,
`text_encoder.…`, `base_model.model.…`) and mixes of them. The loader verdicts come from
lora_offset.formats.loaders, resolved against full-size SD 1.5 module names.
"""

from __future__ import annotations

import collections
import json

from lora_offset.errors import UserError
from lora_offset.formats.loaders import LOADER_TITLES
from lora_offset.formats.modules import alpha_rank, module_kind
from lora_offset.formats.reader import LoraHeader, adapter_configs, peft_scale, read_header, resolve_weights

CONV_MARKERS = (".resnets.", ".downsamplers.", ".upsamplers.")  # conv LoRA ("LoCon") modules
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
KIND_TITLES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


def _counts(values) -> dict[str, int]:
    return {str(k): v for k, v in sorted(collections.Counter(values).items(), key=lambda kv: (-kv[1], str(kv[0])))}


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else round(float(x), 6)


def summarize(header: LoraHeader, names=None, peft_config: dict | None = None) -> dict:
    """Everything `inspect` reports, as a JSON-ready dict (`peft_config`: a PEFT folder's adapter_config)."""
    from lora_offset.formats import loaders

    names = names or loaders.sd15_model_names()
    parsed = {key: loaders.parse_key(key, names) for key in header.shapes}
    unknown = sorted(k for k, p in parsed.items() if p is None)
    modules: dict[tuple[str, str], dict[str, str]] = {}
    for key, p in parsed.items():
        if p is not None:
            modules.setdefault((p.component, p.module), {})[p.role] = key

    configs = adapter_configs(header.metadata, peft_config, "inspect")  # diffusers' lora_adapter_metadata / PEFT config
    ranks, alphas, scales, kinds = [], [], [], []
    for (component, module), roles in modules.items():
        kind = module_kind(roles) or "mixed"
        kinds.append(kind)
        shapes = {role: header.shapes[key] for role, key in roles.items()}
        try:
            rank = alpha_rank(kind, shapes)
        except KeyError:  # a half module: the loaders' verdicts below say what they make of it
            rank = None
        full_lokr = kind == "lokr" and rank is None and any(s in roles for s in ("lokr_w1", "lokr_w2"))
        ranks.append("full" if full_lokr else rank if rank is not None else "?")
        alpha = header.alphas.get(roles.get("alpha", ""))
        if full_lokr:  # both Kronecker factors whole: every loader applies scale 1.0, whatever the alpha
            alphas.append(_number(alpha) if alpha is not None else "none")
            scales.append("1 (LoKr, no low-rank factor)")
        elif alpha is not None:
            alphas.append(_number(alpha))
            scales.append(_number(alpha / rank) if rank else "?")
        elif rank and kind == "lora" and configs.get(component):
            try:  # dotted diffusers files keep alpha in the adapter metadata, not in keys
                scale = peft_scale(configs[component], [module, module.removeprefix("text_model.")], rank, module, "inspect")
                alphas.append(f"{_number(scale * rank)} (adapter config)")
                scales.append(_number(scale))
            except UserError:
                alphas.append("? (adapter metadata disagrees with the weights)")
        else:
            alphas.append("none")
            scales.append("1 (no alpha)")

    meta_shown = {k: v for k, v in header.metadata.items() if k.startswith(("ss_", "modelspec.", "sshs_"))}
    adapter_meta = header.metadata.get("lora_adapter_metadata")
    results = loaders.match_all(list(header.shapes), names)
    results["invokeai"] = loaders.match_invokeai(list(header.shapes), names, shapes=header.shapes)
    total = len(modules)
    return {
        "file": str(header.path),
        "size_bytes": header.size,
        "dtypes": _counts(header.dtypes.values()),
        "key_count": len(header.shapes),
        "key_styles": _counts(p.style for p in parsed.values() if p is not None),
        "modules": {
            "unet": sum(c == "unet" for c, _ in modules),
            "text_encoder": sum(c == "text_encoder" for c, _ in modules),
            "conv": sum(c == "unet" and any(m in f".{p}." for m in CONV_MARKERS) for c, p in modules),
            "total": total,
        },
        "unrecognized_keys": unknown,
        "kinds": _counts(kinds),
        "ranks": _counts(ranks),
        "alphas": _counts(alphas),
        "scales": _counts(scales),
        "hashes": {k: header.metadata[k] for k in HASH_KEYS if k in header.metadata},
        "metadata": dict(sorted(meta_shown.items())),
        "other_metadata_keys": sorted(set(header.metadata) - set(meta_shown)),
        "lora_adapter_metadata": json.loads(adapter_meta) if adapter_meta else None,
        "loaders": {
            name: {
                "applied_modules": len(r.applied_modules),
                "of_modules": total,
                "rejected": r.whole_lora_rejected,
                "ignored_keys": r.ignored_keys,
                "missing_alpha": len(r.missing_alpha),
                "ok": r.ok and len(r.applied_modules) == total,
                "reason": r.reason,
            }
            for name, r in results.items()
        },
    }


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{value} ({n})" for value, n in counts.items()) or "-"


def format_text(s: dict, max_keys: int = 5) -> str:
    m = s["modules"]
    lines = [
        f"file        {s['file']}  ({_human_size(s['size_bytes'])}, {_pairs(s['dtypes'])})",
        f"keys        {s['key_count']}: {_pairs(s['key_styles'])}",
        f"modules     {m['unet']} UNet ({m['conv']} conv) + {m['text_encoder']} text encoder = {m['total']}",
        f"type        {_pairs({KIND_TITLES.get(k, k): n for k, n in s['kinds'].items()})}",
        f"rank        {_pairs(s['ranks'])}",
        f"alpha       {_pairs(s['alphas'])}",
        f"scale       {_pairs(s['scales'])}   (alpha / rank; every loader uses 1.0 where alpha is missing)",
        "hashes      " + (", ".join(f"{k}={v}" for k, v in s["hashes"].items()) or "none"),
    ]
    if s["unrecognized_keys"]:
        shown = ", ".join(s["unrecognized_keys"][:max_keys])
        more = len(s["unrecognized_keys"]) - max_keys
        lines.append(f"unknown     {len(s['unrecognized_keys'])} keys name no SD 1.x module: {shown}"
                     + (f" (+{more} more)" if more > 0 else ""))
    lines.append("metadata" + ("" if s["metadata"] else "    none (A1111 lists such a LoRA as 'Unknown' version)"))
    for key, value in s["metadata"].items():
        value = value if len(value) <= 100 else value[:97] + "..."
        lines.append(f"  {key:<28} {value}")
    if s["lora_adapter_metadata"]:
        lines.append("  lora_adapter_metadata        " + ", ".join(sorted(s["lora_adapter_metadata"])[:8]))
    lines.append("loaders")
    for name, r in s["loaders"].items():
        title = LOADER_TITLES.get(name, name).split()[0]
        if r["rejected"]:
            verdict = f"REJECTED: {r['reason']}"
        else:
            verdict = f"{r['applied_modules']}/{r['of_modules']} modules applied"
            if r["ignored_keys"]:
                verdict += f", {len(r['ignored_keys'])} keys ignored"
            if r["missing_alpha"]:
                verdict += f", {r['missing_alpha']} without alpha (scale 1.0)"
            verdict += "  ok" if r["ok"] else ""
        lines.append(f"  {title:<14} {verdict}")
        if r["ignored_keys"] and not r["rejected"]:
            shown = ", ".join(r["ignored_keys"][:max_keys])
            more = len(r["ignored_keys"]) - max_keys
            lines.append(f"  {'':<14}   ignored: {shown}" + (f" (+{more} more)" if more > 0 else ""))
    kohya_loaders_unhappy = any(not s["loaders"][n]["ok"] for n in ("a1111", "forge", "comfyui"))
    if kohya_loaders_unhappy and set(s["key_styles"]) - {"kohya"}:
        lines.append(f"hint        lora-offset convert {s['file']} OUT.safetensors  writes the plain kohya "
                     "naming every loader reads, at the same scale")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("file", metavar="FILE", help="LoRA .safetensors file (kohya, diffusers or PEFT naming), "
                        "or a PEFT adapter folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args) -> int:
    path, peft_config = resolve_weights(args.file, "inspect")
    summary = summarize(read_header(path), peft_config=peft_config)
    print(json.dumps(summary, indent=2) if args.json else format_text(summary))
    return 0
