"""Single-file Flux.1 checkpoints, as ComfyUI / Forge users keep them (models/unet/flux1-dev.safetensors, or a
ComfyUI "full" checkpoint in models/checkpoints/ that also holds the VAE and both text encoders).

`flux_kind(shapes, name)` tells FLUX.1-dev from -schnell by the tensor names in the safetensors header (dev has the
guidance embedder `guidance_in.*`), and refuses, with a message saying what the file is, the Flux.1 layouts LoRA
Studio cannot train: Fill, Depth/Canny, Redux, Kontext, a diffusers-layout transformer, a LoRA.

`load_flux_single_file(path)` builds a `FluxPipeline`: the transformer from the file (BFL's original layout, bare or
under ComfyUI's `model.diffusion_model.`) with `FluxTransformer2DModel.from_single_file` and the configs shipped in
`configs/flux1-dev|flux1-schnell/`; the VAE and text encoders from the file when it holds them (`vae.*` in LDM layout,
`text_encoders.clip_l.transformer.*`, `text_encoders.t5xxl.transformer.*`); everything else (text encoders, VAE,
tokenizers) from `components`, a diffusers Flux folder or a hub id in the local cache. The scheduler is the shipped
one of the file's kind (the default components are schnell's, whose fixed-shift scheduler is wrong for dev). Nothing
is downloaded.

diffusers' BFL→diffusers converter assumes FLUX.1's 3072-wide blocks; files of other widths (the tiny demo model)
go through `bfl_to_diffusers` here, which tests/test_flux_single_file.py checks against diffusers' at full width.

Pickle checkpoints are refused unless `allow_unsafe_pickle`, as for Stable Diffusion (studio/models/single_file.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from studio.errors import StudioError
from studio.models.flux_keys import bfl_to_diffusers, block_count
from studio.models import CONFIG_ROOT
from studio.models.single_file import _OTHER_NAMES, _Checkpoint, _check_file, _has, _known_other_type

DEFAULT_COMPONENTS = "black-forest-labs/FLUX.1-schnell"  # Apache-2.0, not gated; same encoders and VAE as dev
TRANSFORMER = "model.diffusion_model."  # ComfyUI's prefix for the denoiser in a full checkpoint
VAE = "vae."
CLIP = "text_encoders.clip_l.transformer."
T5 = "text_encoders.t5xxl.transformer."
FULL_WIDTH = 3072  # Flux.1's hidden size; diffusers' converter assumes it (and a 4× MLP)
SUPPORTED = ("LoRA Studio trains text-to-image Flux.1 models — FLUX.1-dev, FLUX.1-schnell and fine-tunes that keep "
             "their layout")
DOWNLOAD = ('hf download black-forest-labs/FLUX.1-schnell --local-dir models/flux1-schnell '
            '--exclude "transformer/*" "*.sft" "flux1-schnell.safetensors"')


def config_dir(kind: str) -> Path:
    """The shipped diffusers-layout configs (no weights) of FLUX.1-dev or -schnell."""
    return CONFIG_ROOT / f"flux1-{kind}"


# ------------------------------------------------------------------------------------------------- recognising

def _transformer_shapes(shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """The denoiser's tensors with ComfyUI's `model.diffusion_model.` prefix removed (a bare file as it is)."""
    if _has(shapes, TRANSFORMER):
        return {k[len(TRANSFORMER):]: tuple(v) for k, v in shapes.items() if k.startswith(TRANSFORMER)}
    return {k: tuple(v) for k, v in shapes.items()}


def _is_lora(keys) -> bool:
    return any("lora_" in k or ".lora_A." in k or ".lora_down." in k for k in keys)


def flux_kind(shapes: Mapping[str, tuple], name: str) -> str | None:
    """'dev' or 'schnell' for a Flux.1 transformer checkpoint (BFL layout, bare or under `model.diffusion_model.`),
    from its tensor names and shapes; None when it is not a Flux.1 transformer. StudioError for the Flux layouts it
    recognises but cannot train (Fill, Depth/Canny, Redux, Kontext, diffusers layout) and for a LoRA file. `name` is
    the file's name (Kontext has dev's shapes and is told apart by it)."""
    if not shapes:
        return None
    if _is_lora(shapes):
        raise StudioError(f"base_model: {name} is a LoRA, not a base model (it holds lora_* adapter weights). Set "
                          f"base_model to the checkpoint the LoRA was made for. {SUPPORTED}.")
    t = _transformer_shapes(shapes)
    if "transformer_blocks.0.attn.to_q.weight" in t and _has(t, "single_transformer_blocks."):
        raise StudioError(
            f"base_model: {name} is a Flux transformer in diffusers layout (transformer_blocks.*, "
            f"single_transformer_blocks.*): one component of a diffusers model folder, not a single-file checkpoint. "
            f"Point base_model at the diffusers folder itself (the one with model_index.json, transformer/, vae/, "
            f"text_encoder/ …) instead.")
    if "redux_up.weight" in t or "redux_down.weight" in t:
        raise StudioError(
            f"base_model: {name} is FLUX.1 Redux, an image embedder (it turns a reference image into extra prompt "
            f"tokens for a Flux transformer), not a Flux.1 transformer. {SUPPORTED}; set base_model to one of those.")
    needed = ("img_in.weight", "vector_in.in_layer.weight", "double_blocks.0.img_mod.lin.weight",
              "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")
    if not all(k in t for k in needed):
        return None  # not Flux.1 (Flux.2 and Chroma have double_blocks too, but no per-block modulation / vector_in)
    in_features = t["img_in.weight"][-1]
    if in_features == 384:
        raise StudioError(
            f"base_model: {name} is FLUX.1 Fill (inpainting/outpainting: its transformer takes 384 input features — "
            f"the packed image, masked image and mask latents — not 64). {SUPPORTED}; use FLUX.1-dev/schnell or a "
            f"text-to-image fine-tune of them.")
    if in_features == 128:
        raise StudioError(
            f"base_model: {name} is a FLUX.1 Depth or Canny control model (its transformer takes 128 input features: "
            f"the image latents plus the control image's). {SUPPORTED}; use FLUX.1-dev/schnell or a text-to-image "
            f"fine-tune of them.")
    if in_features != 64:
        raise StudioError(
            f"base_model: {name} is a Flux.1-like transformer that takes {in_features} input features instead of "
            f"64 (a conditioning/editing variant). {SUPPORTED}.")
    if "kontext" in Path(name).name.lower():
        raise StudioError(
            f"base_model: {name} is FLUX.1 Kontext (by its file name; its weights have dev's shapes): an image-editing "
            f"model conditioned on a reference image, which LoRA Studio cannot train. {SUPPORTED}. If the file is "
            f"in fact a text-to-image fine-tune, rename it so its name does not say 'kontext'.")
    return "dev" if _has(t, "guidance_in.") else "schnell"


def _transformer_overrides(t: Mapping[str, tuple], base: Mapping[str, Any], components: "_Components") -> dict:
    """Config values of the file's transformer that differ from the shipped config (a fine-tune with fewer blocks,
    or the tiny demo model): read from the weights' shapes. `axes_dims_rope` cannot be read from shapes: when the
    head width is not Flux.1's it comes from the components' transformer config."""
    inner, in_channels = t["img_in.weight"]
    head = t["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    patch = base.get("patch_size", 1)
    derived = {"num_layers": block_count(t, "double_blocks."),
               "num_single_layers": block_count(t, "single_blocks."),
               "attention_head_dim": head, "num_attention_heads": inner // head, "in_channels": in_channels,
               "joint_attention_dim": t["txt_in.weight"][1],
               "pooled_projection_dim": t["vector_in.in_layer.weight"][1],
               "guidance_embeds": "guidance_in.in_layer.weight" in t}
    out_channels = t["final_layer.linear.weight"][0] // (patch * patch)
    if out_channels != in_channels:
        derived["out_channels"] = out_channels
    if sum(base.get("axes_dims_rope", ())) != head:
        axes = (components.config("transformer") or {}).get("axes_dims_rope")
        if not axes or sum(axes) != head:
            raise StudioError(f"base_model: {components.name} has attention heads {head} wide (Flux.1's are 128), "
                              f"and no transformer config in base_components ({components.spec}) says how to split "
                              f"them for rotary embeddings. It is not a Flux.1 checkpoint Studio can load. "
                              f"{SUPPORTED}.")
        derived["axes_dims_rope"] = list(axes)
    return {k: v for k, v in derived.items() if base.get(k) != v}


# ------------------------------------------------------------------------------------------------ components

class _Components:
    """Where the parts the file lacks come from: a diffusers Flux folder, or a hub id's snapshot in the local
    Hugging Face cache. Checked before any weight is read, so a missing download fails at once."""

    def __init__(self, spec: str, name: str, wanted: list[str]):
        self.spec, self.name, self.wanted = spec, name, wanted
        local = Path(spec).expanduser()
        if local.is_dir():
            index = local / "model_index.json"
            cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name") if index.is_file() else None
            if cls != "FluxPipeline":
                raise self.error(f"{local} is not a diffusers Flux folder "
                                 f"({f'its model_index.json is for {cls}' if cls else 'it has no model_index.json'})")
            self.root: Path = local
            self.source = str(local)
        else:
            root = self._cached(spec)
            if root is None:
                raise self.error(f"'{spec}' is neither a local folder nor a model in the local Hugging Face cache")
            self.root, self.source = root, spec

    @staticmethod
    def _cached(repo_id: str) -> Path | None:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(repo_id, "model_index.json")
        except Exception:  # not a valid repo id
            return None
        return Path(found).parent if isinstance(found, str) else None

    def error(self, reason: str) -> StudioError:
        what = ", ".join(self.wanted + ["tokenizers"])
        return StudioError(
            f"base_model: {self.name} holds the Flux.1 transformer; the rest of the pipeline ({what}) comes from "
            f"base_components ({self.spec}), which could not be loaded offline: {reason}.\n"
            f"Set `base_components` in the config to a local diffusers Flux folder, e.g. one downloaded with\n"
            f"  {DOWNLOAD}\n"
            f"(then base_components: models/flux1-schnell), or to a hub id such as {DEFAULT_COMPONENTS} that is in "
            f"the local Hugging Face cache.")

    def config(self, subfolder: str) -> dict | None:
        file = self.root / subfolder / "config.json"
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None

    def pick_config(self, subfolder: str, kind: str, fits: Callable[[dict], bool], what: str) -> Path:
        """The config folder for a component the file holds: the shipped FLUX.1 one, or the components' when the
        file's weights are another size (fits() compares a few shapes with the config)."""
        shipped = config_dir(kind)
        for folder in (shipped, self.root):
            file = folder / subfolder / "config.json"
            if file.is_file() and fits(json.loads(file.read_text(encoding="utf-8"))):
                return folder
        raise StudioError(f"base_model: the {what} weights in {self.name} do not match FLUX.1's {what} (config in "
                          f"{shipped / subfolder}) nor a {subfolder}/config.json in base_components ({self.spec}).")

    def load(self, parts: dict[str, Any], dtype):
        """FluxPipeline with `parts` as given and the rest (encoders, VAE, tokenizers) from here, offline."""
        from diffusers import FluxPipeline

        try:
            return FluxPipeline.from_pretrained(self.source, **parts, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as e:
            raise self.error((str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")) from e


# ---------------------------------------------------------------------------------------------------- loading

def _built(component: str, name: str, fn: Callable[[], Any]) -> Any:
    try:
        model = fn()
    except StudioError:
        raise
    except KeyError as e:
        raise StudioError(f"base_model: {name} is missing {component} weights ({e}): the file is incomplete or not a "
                          f"standard Flux.1 checkpoint.") from e
    except (ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StudioError(f"base_model: the {component} weights in {name} do not fit its config ({reason}). The "
                          f"file is not a standard Flux.1 checkpoint.") from e
    model.eval()  # as from_pretrained gives it (diffusers' T5 single-file loader leaves it in training mode: dropout)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise StudioError(f"base_model: {name} is missing {len(missing)} {component} weights (e.g. "
                          f"{', '.join(missing[:3])}): the file is incomplete or not a standard Flux.1 checkpoint.")
    return model


def _layers(shapes: Mapping[str, tuple], prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in shapes if k.startswith(prefix)})


def load_flux_single_file(path, *, allow_unsafe_pickle: bool = False, torch_dtype=None,
                          components: str | None = None):
    """Load a single-file Flux.1 checkpoint as a diffusers `FluxPipeline`.

    The transformer comes from the file (the shipped FLUX.1-dev/schnell configs, adjusted to the file's block
    counts); so do the VAE and text encoders when the file holds them (ComfyUI full checkpoint). The rest — CLIP-L and
    T5-XXL encoders, VAE, tokenizers — comes from `components` (a diffusers Flux folder or a hub id already in the
    Hugging Face cache; default FLUX.1-schnell, whose encoders and VAE are dev's too). The scheduler is the shipped one
    of the file's kind (dev's dynamic shift, schnell's fixed shift), whichever model `components` is. Weights load in
    `torch_dtype` (float32 when None); nothing is downloaded.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = Path(path)
    _check_file(path)
    file = _FluxFile(path, allow_unsafe_pickle, components, torch_dtype or torch.float32)
    parts: dict[str, Any] = {"transformer": _built("transformer", path.name, file.transformer)}
    # A ComfyUI full checkpoint also holds the VAE and the text encoders: those come from the file.
    for part, prefix, what, build in (("vae", VAE, "VAE", file.vae),
                                      ("text_encoder", CLIP, "CLIP-L text encoder", file.clip),
                                      ("text_encoder_2", T5, "T5 text encoder", file.t5)):
        if _has(file.shapes, prefix):
            parts[part] = _built(what, path.name, build)
    configs, sources = file.configs, file.sources
    del file  # the checkpoint's tensors: the built modules hold what they need

    parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(str(configs), subfolder="scheduler")
    pipe = sources.load(parts, torch_dtype or torch.float32)
    pipe.register_to_config(_name_or_path=str(path))
    return pipe


class _FluxFile:
    """One Flux.1 single file: its kind, where its missing parts come from, and a builder per part it holds."""

    def __init__(self, path: Path, allow_unsafe_pickle: bool, components: str | None, dtype):
        self.name, self.dtype = path.name, dtype
        self.ckpt = _Checkpoint(path, allow_unsafe_pickle)
        self.shapes = shapes = self.ckpt.shapes
        self.kind = flux_kind(shapes, self.name)
        if self.kind is None:
            other = _OTHER_NAMES.get(_known_other_type(shapes) or "")
            raise StudioError(f"base_model: {self.name} is not a Flux.1 transformer checkpoint"
                              f"{f' (it looks like {other})' if other else ''}. {SUPPORTED}.")
        self.sources = _Components(components or DEFAULT_COMPONENTS, self.name,
                                   [part for part, prefix in (("CLIP-L text encoder", CLIP), ("T5 text encoder", T5),
                                                              ("VAE", VAE)) if not _has(shapes, prefix)])
        self.configs = config_dir(self.kind)

    def transformer(self):
        from diffusers import FluxTransformer2DModel

        prefix = TRANSFORMER if _has(self.shapes, TRANSFORMER) else ""
        t_shapes = _transformer_shapes(self.shapes)
        base = FluxTransformer2DModel.load_config(str(self.configs), subfolder="transformer")
        overrides = _transformer_overrides(t_shapes, base, self.sources)
        sd = {k[len(prefix):]: v for k, v in self.ckpt.take(prefix).items()
              if prefix or not k.startswith((VAE, "text_encoders."))}
        inner, mlp = t_shapes["img_in.weight"][0], t_shapes["single_blocks.0.linear1.weight"][0]
        if (inner, mlp - 3 * inner) != (FULL_WIDTH, 4 * FULL_WIDTH):
            sd = bfl_to_diffusers(sd)  # diffusers' converter splits at FLUX.1's widths only
        return FluxTransformer2DModel.from_single_file(sd, config=str(self.configs), subfolder="transformer",
                                                       torch_dtype=self.dtype, local_files_only=True, **overrides)

    def vae(self):
        from diffusers import AutoencoderKL

        conv_in = self.shapes.get(VAE + "encoder.conv_in.weight")
        conv_out = self.shapes.get(VAE + "encoder.conv_out.weight")
        folder = self.sources.pick_config("vae", self.kind, lambda c: bool(conv_in and conv_out) and (
            c["block_out_channels"][0] == conv_in[0] and 2 * c["latent_channels"] == conv_out[0]), "VAE")
        return AutoencoderKL.from_single_file(self.ckpt.take(VAE), config=str(folder), subfolder="vae",
                                              torch_dtype=self.dtype, local_files_only=True)

    def clip(self):
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
        from transformers import CLIPTextModel

        width = self.shapes.get(CLIP + "text_model.embeddings.token_embedding.weight", (0, 0))[1]
        layers = _layers(self.shapes, CLIP + "text_model.encoder.layers.")
        folder = self.sources.pick_config("text_encoder", self.kind, lambda c: (
            c["hidden_size"] == width and c["num_hidden_layers"] == layers), "CLIP-L text encoder")
        return create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint=self.ckpt.take(CLIP),
                                                    config=str(folder), subfolder="text_encoder",
                                                    torch_dtype=self.dtype, local_files_only=True)

    def t5(self):
        from diffusers.loaders.single_file_utils import create_diffusers_t5_model_from_checkpoint
        from transformers import T5EncoderModel

        width = self.shapes.get(T5 + "shared.weight", (0, 0))[1]
        layers = _layers(self.shapes, T5 + "encoder.block.")
        folder = self.sources.pick_config("text_encoder_2", self.kind, lambda c: (
            c["d_model"] == width and c["num_layers"] == layers), "T5 text encoder")
        model = create_diffusers_t5_model_from_checkpoint(T5EncoderModel, checkpoint=self.ckpt.take(T5),
                                                          config=str(folder), subfolder="text_encoder_2",
                                                          torch_dtype=self.dtype, local_files_only=True)
        model.tie_weights()  # files hold `shared.weight` only; the encoder's embedding is the same tensor
        return model
