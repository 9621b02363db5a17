"""Single-file SD 1.x checkpoints in the original LDM layout: reading, model family, loading.

Loading (`load_single_file`) uses diffusers' converters on the real tensors, so every LDM variant
diffusers understands loads here too. Pickled files (.ckpt) run code when unpickled: they are
refused unless the user opts in, and even then are read with `torch.load(weights_only=True)`.
The LDM key names and the diffusers <-> LDM map live in lora_offset.formats.ldm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import torch

from lora_offset.errors import UserError
from lora_offset.fileio import check_readable
from lora_offset.formats.ldm import LDM_TEXT_ENCODER_PREFIX, LDM_UNET_PREFIX, LDM_VAE_PREFIX

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PICKLE_OPT_IN = "pass --allow-pickle (or set model.allow_pickle = true in the config)"

CLIP_TOKENIZER_REPO = "openai/clip-vit-large-patch14"
# The weights of a diffusers folder that hold the models LoRAs change.
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_WEIGHTS = Path("text_encoder") / "model.safetensors"


# --------------------------------------------------------------------------------------------
# Reading files


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a pickled .ckpt/.pt/.bin file when `allow_pickle`.

    Pickled files are loaded with `weights_only=True` (no code runs), on the CPU, and a
    top-level "state_dict" entry is unwrapped. Every failure is a UserError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    check_readable(path)  # a PermissionError stays one, rather than a "corrupt file"
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(
                f"{path}: is a pickled {suffix} file, and unpickling can run arbitrary code; "
                f"convert it to .safetensors, or if you trust it {PICKLE_OPT_IN}"
            )
        return _read_pickle(path)
    try:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises several types for truncated or corrupt files
        hint = "" if suffix in SAFETENSORS_SUFFIXES else " (expected a .safetensors or, with --allow-pickle, a .ckpt file)"
        raise UserError(f"{path}: not a readable safetensors file, it may be truncated or corrupt: {e}{hint}") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refusals arrive as UnpicklingError; truncation as others
        raise UserError(
            f"{path}: could not be loaded with torch.load(weights_only=True) (truncated, corrupt, "
            f"or it contains objects other than tensors, which are refused for safety): {e}"
        ) from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file ({} for other files or none)."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    from safetensors import safe_open

    check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file, it may be truncated or corrupt: {e}") from None


# --------------------------------------------------------------------------------------------
# Which model family a checkpoint is


def detect_model_family(state_dict_keys: Iterable[str] | Mapping[str, object]) -> str:
    """'sd1', 'sd2', 'sdxl' or 'unknown' for the keys of an LDM checkpoint.

    Pass the state dict itself (key -> tensor or shape) to also tell SD 2 UNet-only files apart
    by their 1024-wide cross-attention.
    """
    keys = list(state_dict_keys)
    shapes = state_dict_keys if isinstance(state_dict_keys, Mapping) else {}
    if any(k.startswith("conditioner.embedders.") or k.startswith(LDM_UNET_PREFIX + "label_emb.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):  # open_clip text encoder
        return "sd2"
    attn2 = [k for k in keys if k.startswith(LDM_UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    if attn2:
        if shapes:
            shape = tuple(getattr(shapes[attn2[0]], "shape", shapes[attn2[0]]))
            if len(shape) == 2 and shape[1] == 1024:
                return "sd2"
        return "sd1"
    return "unknown"


def require_sd1(keys: Iterable[str] | Mapping[str, object], path: str | Path) -> None:
    """Raise a UserError unless `keys` are those of an SD 1.x LDM checkpoint."""
    family = detect_model_family(keys)
    if family == "sdxl":
        raise UserError(f"{path}: is an SDXL checkpoint; lora-offset trains SD 1.x only")
    if family == "sd2":
        raise UserError(f"{path}: is an SD 2.x checkpoint; lora-offset trains SD 1.x only")
    if family != "sd1":
        raise UserError(
            f"{path}: is not an SD 1.x checkpoint in the original single-file layout "
            f"(no {LDM_UNET_PREFIX}...attn2 keys); pass a diffusers folder or an SD 1.x .safetensors file"
        )


# --------------------------------------------------------------------------------------------
# Loading a single file as diffusers components


def ldm_map_of(state: Mapping[str, object], config_dir: str | Path | None = None) -> dict[str, dict[str, str]]:
    """{component: {diffusers key: LDM key}} for the UNet and text-encoder keys of an LDM state dict,
    as diffusers' converters read that file (configs from `config_dir`, default SD 1.5's)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lora_offset.formats.ldm import derive_ldm_map

    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    return derive_ldm_map({k: v for k, v in state.items() if not k.startswith(LDM_VAE_PREFIX)},
                          UNet2DConditionModel.load_config(config_dir / "unet"), AutoencoderKL.load_config(config_dir / "vae"))


def read_model_weights(path: str | Path, *, allow_pickle: bool = False, what: str = "") -> dict[str, dict[str, torch.Tensor]]:
    """{"unet": {diffusers key: tensor}, "text_encoder": {key: tensor}} of an SD 1.x model, read as stored.

    `path` is a single-file LDM checkpoint or a diffusers folder. Text-encoder keys have no
    `text_model.` level (transformers 5's CLIPTextModel names). Every problem is a UserError naming the path.
    """
    path = Path(path)
    prefix = f"{what}: " if what else ""
    if path.is_dir():
        weights = {}
        for component, relative in (("unet", UNET_WEIGHTS), ("text_encoder", TEXT_ENCODER_WEIGHTS)):
            if not (path / relative).is_file():
                raise UserError(f"{prefix}{path}: diffusers folder has no {relative} (unsharded .safetensors weights "
                                "of the UNet and the text encoder are needed)")
            weights[component] = {k.removeprefix("text_model."): v for k, v in read_state_dict(path / relative).items()}
        return weights
    if not path.is_file():
        raise UserError(f"{prefix}{path}: no such file or folder")
    state = read_state_dict(path, allow_pickle=allow_pickle)
    require_sd1(state, path)
    key_map = ldm_map_of(state)
    return {component: {k: state[v] for k, v in key_map[component].items()} for component in ("unet", "text_encoder")}


def default_config_dir() -> Path:
    from lora_offset.sd15 import SD15_CONFIG_DIR

    return SD15_CONFIG_DIR


def load_single_file(path: str | Path, *, allow_pickle: bool = False, config_dir: str | Path | None = None,
                     tokenizer: str | Path | None = None, torch_dtype: torch.dtype | None = torch.float32) -> dict:
    """Load an SD 1.x LDM checkpoint as diffusers components {unet, vae, text_encoder, tokenizer, scheduler}.

    `config_dir` is a diffusers-layout folder with unet/, vae/, text_encoder/ and scheduler/
    configs (default: SD 1.5's, shipped with the package). The tokenizer comes from the folder
    `tokenizer` (config `model.tokenizer`), else `config_dir/tokenizer`, else it is SD 1.x's CLIP
    ViT-L/14 tokenizer built from OpenAI's CLIP BPE file (formats/clip_tokenizer.py).
    Nothing is downloaded. Weights are converted with diffusers' own single-file converters.
    `torch_dtype` casts floating tensors (None keeps the file's dtypes).
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        if not (config_dir / sub).is_dir():
            raise UserError(f"{config_dir}: model config folder has no {sub}/ subfolder (expected a diffusers-layout folder)")
    state = read_state_dict(path, allow_pickle=allow_pickle)
    require_sd1(state, path)
    if not any(k.startswith(LDM_VAE_PREFIX) for k in state) or not any(k.startswith(LDM_TEXT_ENCODER_PREFIX) for k in state):
        raise UserError(f"{path}: has no VAE ({LDM_VAE_PREFIX}*) or no text encoder ({LDM_TEXT_ENCODER_PREFIX}*) weights; "
                        "a full SD 1.x checkpoint is needed")

    unet_config = UNet2DConditionModel.load_config(config_dir / "unet")
    vae_config = AutoencoderKL.load_config(config_dir / "vae")
    with init_empty_weights():  # parameters on the meta device: no random init of a 1 GB model
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))

    text_state = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}
    converted = {
        "unet": (unet, convert_ldm_unet_checkpoint(state, unet_config)),
        "vae": (vae, convert_ldm_vae_checkpoint(state, vae_config)),
        "text_encoder": (text_encoder, text_state),
    }
    for name, (model, weights) in converted.items():
        _load_converted(model, weights, path, name, config_dir, torch_dtype)

    loaded_tokenizer = load_tokenizer(config_dir, tokenizer)
    if len(loaded_tokenizer) != text_encoder.config.vocab_size:
        raise UserError(f"{path}: the tokenizer has {len(loaded_tokenizer)} tokens but the text encoder "
                        f"(config {config_dir / 'text_encoder'}) has {text_encoder.config.vocab_size}; "
                        'set model.tokenizer = "<folder>" to the tokenizer this model was trained with')
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": loaded_tokenizer,
        "scheduler": load_scheduler(config_dir),
    }


def load_single_file_vae(path: str | Path, *, allow_pickle: bool = False, config_dir: str | Path | None = None,
                         torch_dtype: torch.dtype | None = torch.float32):
    """An AutoencoderKL from a single VAE file (e.g. vae-ft-mse-840000-ema-pruned.safetensors).

    Accepts LDM keys bare (`encoder.down.0...`) or prefixed (`first_stage_model.`, `vae.`, as in
    a full checkpoint) and diffusers keys (`encoder.down_blocks.0...`). The architecture comes
    from `config_dir/vae` (default SD 1.5's).
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = Path(path)
    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    if not (config_dir / "vae").is_dir():
        raise UserError(f"{config_dir}: model config folder has no vae/ subfolder (expected a diffusers-layout folder)")
    state = read_state_dict(path, allow_pickle=allow_pickle)
    config = AutoencoderKL.load_config(config_dir / "vae")
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
        weights = state  # already diffusers names
    else:
        weights = convert_ldm_vae_checkpoint(state, config)
    _load_converted(vae, weights, path, "vae", config_dir, torch_dtype)
    return vae


def _load_converted(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], path: Path, name: str,
                    config_dir: Path, torch_dtype: torch.dtype | None) -> None:
    """Load converted weights into a model built on the meta device; UserError if they do not fit."""
    expected = model.state_dict()
    weights = {k: v for k, v in weights.items() if k in expected}  # e.g. position_ids: a non-persistent buffer here
    missing = sorted(k for k in expected if k not in weights)
    if missing:
        raise UserError(f"{path}: {name} weights missing for {len(missing)} tensors, e.g. {missing[:3]}; "
                        f"is the file complete, and does it match the configs in {config_dir}?")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(f"{path}: {name} tensor {k} has shape {tuple(v.shape)} but the config in "
                            f"{config_dir / name} needs {tuple(expected[k].shape)}; pass the matching model config folder")
    if torch_dtype is not None:
        weights = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    model.eval()


def load_tokenizer(config_dir: str | Path, tokenizer_dir: str | Path | None = None):
    """CLIP tokenizer from `tokenizer_dir`, else `config_dir/tokenizer`, else SD 1.x's CLIP ViT-L/14 tokenizer.

    Never downloads. The last case builds openai/clip-vit-large-patch14's tokenizer from the BPE
    file that openai-clip ships (`clip_tokenizer.build_clip_tokenizer`), or when that package is
    missing takes the tokenizer from the local Hugging Face cache. Every candidate folder must
    hold vocab.json and merges.txt: transformers 5 quietly builds a 2-token tokenizer from a
    folder without them.
    """
    from transformers import CLIPTokenizer

    from lora_offset.formats import clip_tokenizer

    if tokenizer_dir is not None:
        folder = Path(tokenizer_dir)
        if not _has_tokenizer_files(folder):
            raise UserError(f"{folder}: model.tokenizer folder has no vocab.json and merges.txt (expected a CLIP tokenizer folder)")
        return CLIPTokenizer.from_pretrained(str(folder))
    folder = Path(config_dir) / "tokenizer"
    if _has_tokenizer_files(folder):
        return CLIPTokenizer.from_pretrained(str(folder))
    if clip_tokenizer.find_clip_bpe_file() is not None:
        return clip_tokenizer.build_clip_tokenizer()
    cached = _cached_clip_tokenizer_folder()
    if cached is not None:
        return CLIPTokenizer.from_pretrained(str(cached))
    raise UserError(
        f"no CLIP tokenizer: {folder} does not exist, openai-clip (whose BPE vocabulary builds SD 1.x's "
        f"tokenizer) is not installed and {CLIP_TOKENIZER_REPO} is not in the local Hugging Face cache; "
        f"install it ({clip_tokenizer.CLIP_INSTALL}) or set model.tokenizer = \"<folder>\" "
        "to a folder with the SD 1.x tokenizer (vocab.json, merges.txt)"
    )


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def _cached_clip_tokenizer_folder() -> Path | None:
    """The snapshot folder of openai/clip-vit-large-patch14's tokenizer in the local HF cache, if complete."""
    from huggingface_hub import try_to_load_from_cache

    found = [try_to_load_from_cache(CLIP_TOKENIZER_REPO, name) for name in ("vocab.json", "merges.txt")]
    if all(isinstance(f, str) for f in found):
        folder = Path(found[0]).parent
        if _has_tokenizer_files(folder):
            return folder
    return None


def load_scheduler(config_dir: str | Path):
    import diffusers

    folder = Path(config_dir) / "scheduler"
    config = json.loads((folder / "scheduler_config.json").read_text(encoding="utf-8"))
    cls = getattr(diffusers, config.get("_class_name", "PNDMScheduler"), diffusers.PNDMScheduler)
    return cls.from_config(config)
