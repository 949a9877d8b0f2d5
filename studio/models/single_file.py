"""Single-file checkpoints, as A1111 / ComfyUI users keep them (models/Stable-diffusion/*.safetensors), and the
Stable Diffusion loader for them (Flux.1's is studio/models/flux_single_file.py).

`detect_family(path)` asks the registered families which one the weights' names in the safetensors header belong to
(never the file name, never the weights themselves). `load_single_file(path)` builds a diffusers pipeline from the file with diffusers' own
single-file converters (`UNet2DConditionModel.from_single_file`, `AutoencoderKL.from_single_file`,
`create_diffusers_clip_model_from_ldm`) and the configs shipped in `studio/models/configs/<family>/`, so nothing is downloaded.

Why component by component rather than `StableDiffusionXLPipeline.from_single_file`: the pipeline loader picks the
checkpoint prefix of each text encoder by hidden size, so when both SDXL encoders have the same width (the tiny demo
models) it silently fills `text_encoder_2` from the CLIP-L weights. Here each component gets exactly its own prefix;
the checkpoint is also read once, one component's tensors at a time, and pickles are only ever opened on purpose.

Pickle checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) are refused unless the run sets `allow_unsafe_pickle: true`.
"""

from __future__ import annotations

import inspect
import json
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

from studio.errors import StudioError, refuse_pickle
from studio.families import Family, family_of_shapes, supported_text

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = SAFE_SUFFIXES + PICKLE_SUFFIXES

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD15_TEXT = "cond_stage_model.transformer."
SDXL_TEXT = "conditioner.embedders.0.transformer."
SDXL_TEXT_2 = "conditioner.embedders.1.model."
# Where each pipeline's text encoders live in an A1111-layout checkpoint.
TEXT_ENCODERS = {"StableDiffusionPipeline": {"text_encoder": SD15_TEXT},
                 "StableDiffusionXLPipeline": {"text_encoder": SDXL_TEXT, "text_encoder_2": SDXL_TEXT_2}}


class _QuietFp32Notice(logging.Filter):
    """diffusers warns "modules that should be kept in float32: []" on every dtype cast in from_single_file, even
    when the list is empty; that is noise for a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_QuietFp32Notice())



def _convert_hint(path: Path) -> str:
    out = path.with_suffix(".safetensors")
    return (
        "convert it to .safetensors once (this unpickles it, so only for a file you trust), e.g.\n"
        f"  python -c \"import torch, safetensors.torch as st; sd = torch.load(r'{path}', map_location='cpu', "
        "weights_only=False); sd = sd.get('state_dict', sd); st.save_file({k: v.contiguous() for k, v in "
        f"sd.items() if isinstance(v, torch.Tensor)}}, r'{out}')\"\n"
        f"or download the .safetensors version most model pages offer; then set base_model: {out}"
    )


def is_single_file(path: str | Path) -> bool:
    """True when `path` names a checkpoint file (by suffix) rather than a diffusers folder or a hub id."""
    p = Path(path)
    return p.suffix.lower() in SINGLE_FILE_SUFFIXES and not p.is_dir()


def is_pickle(path: str | Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


# ----------------------------------------------------------------------------------------------- reading the file

def _check_file(path: Path) -> None:
    if not path.is_file():
        raise StudioError(f"base_model: checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise StudioError(f"base_model: {path.name} is not a checkpoint file Studio can read (expected "
                          f"{', '.join(SINGLE_FILE_SUFFIXES)}), nor a diffusers model folder.")


def _refuse_pickle(path: Path) -> StudioError:
    return refuse_pickle(f"base_model: {path.name} is a pickle checkpoint ({path.suffix})",
                         f"If you trust where it came from, set `allow_unsafe_pickle: true` in the run config. "
                         f"Better: {_convert_hint(path)}")


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names → shapes from the safetensors header; no tensor data is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise StudioError(f"base_model: {path.name} is not a readable .safetensors file ({e}). "
                          f"Is the download complete?") from e


def _load_pickle(path: Path) -> dict[str, Any]:
    import torch

    try:
        try:  # the restricted unpickler first: plain tensor checkpoints need nothing more
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError:
            # The user allowed full unpickling: old training checkpoints also hold callbacks / optimizer objects.
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise StudioError(f"base_model: could not read {path.name} as a PyTorch checkpoint ({e}).") from e
    while isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise StudioError(f"base_model: {path.name} does not hold a state dict (found {type(obj).__name__}).")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


class _Checkpoint:
    """The file's tensors, handed out one component (key prefix) at a time so a large file is never held twice."""

    def __init__(self, path: Path, allow_unsafe_pickle: bool):
        self.path = path
        self._tensors: dict[str, Any] | None = None
        if is_pickle(path):
            if not allow_unsafe_pickle:
                raise _refuse_pickle(path)
            self._tensors = _load_pickle(path)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        else:
            self.shapes = _header_shapes(path)

    def take(self, prefix: str) -> dict[str, Any]:
        if self._tensors is not None:
            return {k: self._tensors.pop(k) for k in [k for k in self._tensors if k.startswith(prefix)]}
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------------ family detection

def _has(shapes: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _known_other_type(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """diffusers' own key-based guess at what the file is, for the error message only."""
    try:
        import torch
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type

        class _Shaped:  # infer_diffusers_model_type looks at `.shape` only (for the families we name here)
            def __init__(self, shape):
                self.shape = torch.Size(shape)

        return infer_diffusers_model_type({k: _Shaped(s) for k, s in shapes.items()})
    except Exception:
        return None


_OTHER_NAMES = {"v2": "Stable Diffusion 2.x", "xl_refiner": "SDXL refiner", "upscale": "SD x4 upscaler",
                "playground-v2-5": "Playground v2.5", "sd3": "Stable Diffusion 3", "sd35_medium": "SD 3.5 Medium",
                "sd35_large": "SD 3.5 Large", "flux-dev": "FLUX.1", "flux-schnell": "FLUX.1", "flux-fill": "FLUX.1",
                "flux-depth": "FLUX.1", "flux-2-dev": "FLUX.2", "controlnet": "ControlNet",
                "controlnet_xl_large": "ControlNet (SDXL)", "controlnet_xl_mid": "ControlNet (SDXL)",
                "controlnet_xl_small": "ControlNet (SDXL)", "stable_cascade_stage_b": "Stable Cascade",
                "stable_cascade_stage_c": "Stable Cascade", "animatediff_v2": "AnimateDiff motion module",
                "animatediff_v3": "AnimateDiff motion module", "auraflow": "AuraFlow", "hunyuan-video": "HunyuanVideo",
                "ltx-video": "LTX-Video", "mochi-1-preview": "Mochi", "lumina2": "Lumina 2", "sana": "Sana",
                "wan-t2v-14B": "Wan", "wan-t2v-1.3B": "Wan", "hidream": "HiDream", "chroma": "Chroma"}


def stable_diffusion_kind(shapes: Mapping[str, tuple[int, ...]], name: str = "checkpoint") -> str | None:
    """'sd15' or 'sdxl' for an A1111-layout checkpoint; None when it has no SD UNet; StudioError for an SD layout
    that cannot be trained (inpainting, refiner, SD2, UNet-only, no VAE)."""
    supported = f"Studio trains LoRAs on {supported_text()} checkpoints."
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        return None
    if len(conv_in) == 4 and conv_in[1] != 4:
        kind = {9: "an inpainting", 8: "an instruct-pix2pix"}.get(conv_in[1], f"a {conv_in[1]}-channel")
        raise StudioError(f"base_model: {name} is {kind} model (its UNet takes {conv_in[1]} input channels, not 4). "
                          f"Use the matching regular text-to-image checkpoint. {supported}")
    if _has(shapes, SDXL_TEXT_2) and _has(shapes, SDXL_TEXT):
        family = "sdxl"
    elif _has(shapes, SD15_TEXT):
        family = "sd15"
    elif _has(shapes, "conditioner.embedders.0.model."):
        raise StudioError(f"base_model: {name} is an SDXL refiner checkpoint; LoRAs are trained on SDXL base "
                          f"models. {supported}")
    elif _has(shapes, "cond_stage_model.model."):
        raise StudioError(f"base_model: {name} is a Stable Diffusion 2.x checkpoint (OpenCLIP-H text encoder), "
                          f"which is not supported. {supported}")
    else:
        raise StudioError(f"base_model: {name} has UNet weights but no text encoder ({SD15_TEXT}* for SD1.5, "
                          f"{SDXL_TEXT}* + {SDXL_TEXT_2}* for SDXL) — a UNet-only file cannot be trained on its "
                          f"own. Use the full checkpoint.")
    if not _has(shapes, VAE):
        raise StudioError(f"base_model: {name} has no VAE weights ({VAE}*). Use a checkpoint with the VAE baked in "
                          f"(most are).")
    return family


def family_from_shapes(shapes: Mapping[str, tuple[int, ...]], name: str = "checkpoint") -> Family:
    """The registered family whose checkpoint layout the tensor names have; StudioError that says what the file is
    otherwise (an adapter, a lone component, a VAE, another model type)."""
    supported = f"Studio trains LoRAs on {supported_text()} checkpoints."
    if not shapes:
        raise StudioError(f"base_model: {name} holds no tensors.")
    keys = list(shapes)
    if any("lora_" in k or ".lora." in k or ".hada_" in k or ".lokr_" in k or ".lora_A." in k for k in keys):
        raise StudioError(f"base_model: {name} is a LoRA/LyCORIS adapter, not a base model. Set base_model to the "
                          f"checkpoint it was trained on; {supported}")
    family = family_of_shapes(shapes, name)
    if family is not None:
        return family
    if _has(shapes, "down_blocks.") or _has(shapes, "text_model."):
        raise StudioError(f"base_model: {name} holds a single diffusers-format component (UNet or text encoder), "
                          f"not a full checkpoint. Point base_model at the whole diffusers model folder instead.")
    if _has(shapes, "encoder.down.") or _has(shapes, "decoder.up.") or _has(shapes, "encoder.down_blocks."):
        raise StudioError(f"base_model: {name} is a standalone VAE, not a full checkpoint. {supported}")
    other = _OTHER_NAMES.get(_known_other_type(shapes) or "")
    what = f"It looks like a {other} file. " if other else ""
    raise StudioError(f"base_model: {name} is not a checkpoint layout Studio recognises. {what}{supported}")


def detect_family(path: str | Path, *, allow_unsafe_pickle: bool = False) -> Family:
    """The family of a single-file checkpoint, from the tensor names in its safetensors header (no tensor data is
    read). Pickle files are refused unless `allow_unsafe_pickle` (then they have to be loaded to be read)."""
    path = Path(path)
    _check_file(path)
    if is_pickle(path):
        if not allow_unsafe_pickle:
            raise _refuse_pickle(path)
        shapes = {k: tuple(v.shape) for k, v in _load_pickle(path).items()}
    else:
        shapes = _header_shapes(path)
    return family_from_shapes(shapes, path.name)


# ------------------------------------------------------------------------------------------------------- loading

def _read_index(config_dir: Path, family: Family, name: str) -> dict:
    index_file = config_dir / "model_index.json"
    if not index_file.is_file():
        raise StudioError(f"Single-file config folder {config_dir} has no model_index.json (expected a diffusers "
                          f"layout: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    if index.get("_class_name") not in TEXT_ENCODERS or index["_class_name"] not in family.pipeline_classes:
        raise StudioError(f"{name} is an {family.label} checkpoint but the config folder {config_dir} is for "
                          f"{index.get('_class_name')}; use an {family.pipeline_classes[0]} config folder.")
    return index


def _no_meta(model, component: str, name: str) -> None:
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise StudioError(f"base_model: {name} is missing {len(missing)} {component} weights (e.g. "
                          f"{', '.join(missing[:3])}) — the file is incomplete or not a standard "
                          f"SD1.5/SDXL checkpoint.")


def _build(component: str, name: str, config_dir: Path, fn: Callable[[], Any]) -> Any:
    try:
        model = fn()
    except StudioError:
        raise
    except (ValueError, RuntimeError, KeyError) as e:
        reason = str(e).split(". If you want", 1)[0].replace("Cannot load  because ", "")
        raise StudioError(f"base_model: the {component} weights in {name} do not fit the config in {config_dir} "
                          f"({reason}). The file is not a standard checkpoint of its family, or the config folder "
                          f"does not match it.") from e
    _no_meta(model, component, name)
    return model


def load_single_file(path: str | Path, *, allow_unsafe_pickle: bool = False, config_dir: str | Path | None = None,
                     torch_dtype=None, **_):
    """Load a single-file SD1.5/SDXL checkpoint as a diffusers pipeline.

    `config_dir` is a diffusers-layout folder with the component configs, tokenizers and scheduler (no weights
    needed); by default the shipped configs of the detected family (studio/models/configs/). Weights load in
    `torch_dtype` (float32 when None). No network access: everything comes from the file and `config_dir`.
    """
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTokenizer

    path = Path(path)
    _check_file(path)
    ckpt = _Checkpoint(path, allow_unsafe_pickle)
    family = family_from_shapes(ckpt.shapes, path.name)
    config_dir = Path(config_dir) if config_dir is not None else family.config_path
    index = _read_index(config_dir, family, path.name)
    cfg = str(config_dir)
    dtype = torch_dtype or torch.float32
    common = {"config": cfg, "torch_dtype": dtype, "local_files_only": True}

    def clip(subfolder: str, prefix: str):
        cls = getattr(transformers, index[subfolder][1])
        return create_diffusers_clip_model_from_ldm(cls, checkpoint=ckpt.take(prefix), config=cfg,
                                                    subfolder=subfolder, torch_dtype=dtype, local_files_only=True)

    parts: dict[str, Any] = {}
    parts["unet"] = _build("UNet", path.name, config_dir, lambda: UNet2DConditionModel.from_single_file(
        ckpt.take(UNET), subfolder="unet", **common))
    parts["vae"] = _build("VAE", path.name, config_dir, lambda: AutoencoderKL.from_single_file(
        ckpt.take(VAE), subfolder="vae", **common))
    for component, prefix in TEXT_ENCODERS[index["_class_name"]].items():
        parts[component] = _build(component.replace("_", " "), path.name, config_dir,
                                  lambda: clip(component, prefix))
    del ckpt

    try:
        for component in TEXT_ENCODERS[index["_class_name"]]:
            tokenizer = component.replace("text_encoder", "tokenizer")
            parts[tokenizer] = CLIPTokenizer.from_pretrained(cfg, subfolder=tokenizer)
        scheduler_cls = getattr(diffusers, index["scheduler"][1])
        parts["scheduler"] = scheduler_cls.from_pretrained(cfg, subfolder="scheduler")
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise StudioError(f"Single-file config folder {config_dir} is incomplete: {e}") from e

    pipe_cls = getattr(diffusers, index["_class_name"])
    # No NSFW classifier, no invisible watermark: a training studio renders samples, not a hosted service.
    quiet = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False,
             "add_watermarker": False, "force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True)}
    accepted = inspect.signature(pipe_cls.__init__).parameters
    pipe = pipe_cls(**parts, **{k: v for k, v in quiet.items() if k in accepted})
    pipe.register_to_config(_name_or_path=str(path))
    return pipe
