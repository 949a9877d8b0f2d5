"""Single-file checkpoints that hold only a denoiser transformer, as ComfyUI users keep the newer families
(`models/diffusion_models/chroma1-hd.safetensors`, `z_image_turbo_bf16.safetensors`): the transformer comes from the
file, everything else (text encoder, VAE, tokenizer) from `base_components`, a diffusers folder of the same family
or a hub id already in the local Hugging Face cache. Nothing is downloaded.

What differs per family is a `TransformerFile` its module declares: the pipeline and transformer classes, its
shipped configs, how its file names map to diffusers' (`to_diffusers`), and which config values the file's shapes
override (a fine-tune with fewer blocks, the tiny test models). The weights are assigned into a transformer built on
the meta device, so a 9 B model is never held twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from studio.errors import StudioError
from studio.models.single_file import _Checkpoint, _check_file

COMFY_PREFIX = "model.diffusion_model."  # ComfyUI's prefix for the denoiser in a saved checkpoint


@dataclass(frozen=True)
class TransformerFile:
    label: str  # what people call the family, for messages
    pipeline: str  # diffusers pipeline class name
    transformer: str  # diffusers transformer class name
    config_dir: Path  # shipped diffusers-layout configs (model_index.json, transformer/, scheduler/ …)
    default_components: str  # hub id the rest of the pipeline comes from when base_components is not set
    to_diffusers: Callable[[dict], dict]  # the file's transformer tensors (no prefix) → diffusers names
    overrides: Callable[[Mapping[str, tuple]], dict]  # the file's shapes (no prefix) → transformer config values

    def __call__(self, path, **kwargs):
        """The family's `single_file_loader`: its module binds its spec to `load_single_file`."""
        return load_transformer_single_file(self, path, **kwargs)


def transformer_shapes(shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """The denoiser's tensor shapes with ComfyUI's `model.diffusion_model.` prefix removed (a bare file as it is)."""
    if any(k.startswith(COMFY_PREFIX) for k in shapes):
        return {k[len(COMFY_PREFIX):]: tuple(v) for k, v in shapes.items() if k.startswith(COMFY_PREFIX)}
    return {k: tuple(v) for k, v in shapes.items()}


def _components(spec: TransformerFile, source: str, name: str) -> str:
    """A local diffusers folder of the family, or a hub id whose snapshot is in the local cache."""
    def error(reason: str) -> StudioError:
        return StudioError(
            f"base_model: {name} holds the {spec.label} transformer only; the text encoder, VAE and tokenizer come "
            f"from base_components ({source}), which could not be loaded offline: {reason}. Set base_components to "
            f"a local diffusers {spec.label} folder, e.g. one downloaded with `hf download {spec.default_components} "
            f"--local-dir models/{spec.default_components.split('/')[-1]} --exclude \"transformer/*\"`.")

    local = Path(source).expanduser()
    if local.is_dir():
        index = local / "model_index.json"
        cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name") if index.is_file() else None
        if cls != spec.pipeline:
            raise error(f"{local} is not a diffusers {spec.label} folder "
                        f"({f'its model_index.json is for {cls}' if cls else 'it has no model_index.json'})")
        return str(local)
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(source, "model_index.json")
    except Exception:  # not a valid repo id
        found = None
    if not isinstance(found, str):
        raise error(f"'{source}' is neither a local folder nor a model in the local Hugging Face cache")
    return source


def _base_config(spec: TransformerFile, source: str) -> dict:
    """The components' transformer config when they have one (a fine-tune's exact values, e.g. its rotary axes),
    else the shipped one."""
    local = Path(source) / "transformer" / "config.json"
    if not local.is_file():
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(source, "transformer/config.json") if not Path(source).is_dir() else None
        local = Path(found) if isinstance(found, str) else spec.config_dir / "transformer" / "config.json"
    return json.loads(local.read_text(encoding="utf-8"))


def _transformer(spec: TransformerFile, ckpt: _Checkpoint, name: str, base: dict, dtype):
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, spec.transformer)
    config = {**base, **spec.overrides(transformer_shapes(ckpt.shapes))}
    prefix = COMFY_PREFIX if any(k.startswith(COMFY_PREFIX) for k in ckpt.shapes) else ""
    try:
        weights = spec.to_diffusers({k[len(prefix):]: v for k, v in ckpt.take(prefix).items()})
        with init_empty_weights():
            model = cls.from_config(config)
        model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)
    except (KeyError, RuntimeError, ValueError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise StudioError(f"base_model: the weights in {name} do not fit the {spec.label} transformer ({reason}). "
                          f"The file is incomplete or not a standard {spec.label} checkpoint.") from e
    return model.to(dtype).eval()


def load_transformer_single_file(spec: TransformerFile, path, *, allow_unsafe_pickle: bool = False,
                                 torch_dtype=None, components: str | None = None):
    """The family's diffusers pipeline: the transformer from `path`, the rest from `components`, the scheduler
    shipped for the family. Weights in `torch_dtype` (float32 when None)."""
    import diffusers
    import torch

    path = Path(path)
    _check_file(path)
    ckpt = _Checkpoint(path, allow_unsafe_pickle)
    source = _components(spec, components or spec.default_components, path.name)
    dtype = torch_dtype or torch.float32
    transformer = _transformer(spec, ckpt, path.name, _base_config(spec, source), dtype)
    del ckpt
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(spec.config_dir), subfolder="scheduler")
    try:
        pipe = getattr(diffusers, spec.pipeline).from_pretrained(source, transformer=transformer, scheduler=scheduler,
                                                                 dtype=dtype, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as e:
        raise StudioError(f"base_model: the rest of the {spec.label} pipeline could not be loaded from "
                          f"base_components ({source}): {(str(e).strip().splitlines() or [type(e).__name__])[0]}. "
                          f"Set base_components to a local diffusers {spec.label} folder.") from e
    pipe.register_to_config(_name_or_path=str(path))
    return pipe
