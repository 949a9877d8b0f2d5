"""Does an image LoRA file load completely? Checked against the base model it is for, before anyone finds out in a
WebUI's "lora key not loaded" log.

Each tensor's module is looked up among the base model's layers under every name the consumers read:
- kohya names, `lora_unet_` / `lora_te_` (`lora_te1_`, `lora_te2_` on SDXL) + the diffusers module path with
  underscores (A1111 and Forge convert these to their layer names, ComfyUI maps them directly; text encoder paths
  keep transformers' `text_model.` level);
- kohya names after the original (LDM) UNet layout, `lora_unet_input_blocks_…` (kohya's SDXL files); these come from
  studio.models.ldm_layout, each one confirmed by running diffusers' own single-file conversion on it;
- diffusers / peft keys, `unet.…` / `transformer.…` / `text_encoder.…` + the dotted module path.
Then the shapes: the down/A matrix must take the layer's inputs, the up/B matrix give its outputs, at one rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from studio.errors import StudioError
from studio.families import Family

# What a module's tensors are called, by format: kohya LoRA / LoCon, diffusers-peft, and the LyCORIS kinds (their
# modules are resolved; their factor shapes are not checked here).
DOWN, UP = (".lora_down.weight", ".lora_A.weight"), (".lora_up.weight", ".lora_B.weight")
OTHER = (".alpha", ".lora_mid.weight", ".dora_scale", ".lora_magnitude_vector", ".hada_w1_a", ".hada_w1_b",
         ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2", ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2",
         ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}  # diffusers'
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
PEFT_PARTS = (".base_layer", ".lora_A.default", ".lora_B.default")  # inside a peft-wrapped layer
SHOWN = 5  # problems listed in the summary; the rest are counted


@dataclass
class SelfTest:
    keys: int
    loaders: tuple[str, ...]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.keys > 0 and not self.problems

    def summary(self) -> str:
        loaders = " / ".join(self.loaders)
        if self.ok:
            return f"all {self.keys} keys load in {loaders}"
        if not self.keys:
            return "the file holds no tensors"
        more = len(self.problems) - SHOWN
        listed = "; ".join(self.problems[:SHOWN]) + (f"; and {more} more" if more > 0 else "")
        return f"{len(self.problems)} problem(s) among {self.keys} keys ({loaders} would skip those layers): {listed}"


def check_lora_file(path: str | Path, pipe, family: Family) -> SelfTest:
    return check_lora(load_file(str(path)), pipe, family)


def check_against_base(path: str | Path, base_model: str, allow_unsafe_pickle: bool = False) -> SelfTest:
    """Any LoRA `.safetensors` checked against a base model given as the config gives it (folder, file, hub id)."""
    from studio.models.pipelines import load_pipeline

    path = Path(path).expanduser()
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        raise StudioError(f"{path} is not a .safetensors file. Give the path of an image LoRA file.")
    pipe, family = load_pipeline(base_model, allow_unsafe_pickle=allow_unsafe_pickle)
    try:
        return check_lora_file(path, pipe, family)
    except SafetensorError as exc:
        raise StudioError(f"{path} cannot be read as a safetensors file ({exc}).") from None


def check_lora(tensors: dict[str, torch.Tensor], pipe, family: Family) -> SelfTest:
    """Every key of `tensors` resolved to a layer of `pipe` (a diffusers pipeline of `family`) with matching shapes."""
    layers = layer_names(pipe, family)
    problems, modules = [], {}
    for key in tensors:
        suffix = next((s for s in (*DOWN, *UP, *OTHER) if key.endswith(s)), None)
        if suffix is None:
            problems.append(f"{key}: not a LoRA tensor name")
            continue
        name = key[:-len(suffix)]
        if name not in layers:
            problems.append(f"{key}: no layer {name} in the base model")
            continue
        modules.setdefault(name, {})[suffix] = tensors[key]
    for name, parts in modules.items():
        problems += _shape_problems(name, parts, layers[name])
    return SelfTest(len(tensors), family.lora_loaders, problems)


def _shape_problems(name: str, parts: dict[str, torch.Tensor], layer: torch.nn.Module) -> list[str]:
    down = next((parts[s] for s in DOWN if s in parts), None)
    up = next((parts[s] for s in UP if s in parts), None)
    weight = getattr(layer, "weight", None)
    if weight is None:
        return [f"{name}: the base layer has no weight to adapt"]
    if down is None and up is None:
        wanted = (weight.shape[0], weight[0].numel())
        return [f"{name}: its factors build a {built[0]}×{built[1]} update, the layer's weight is "
                f"{wanted[0]}×{wanted[1]}" for built in _lycoris_shapes(parts) if built != wanted]
    if down is None or up is None:
        return [f"{name}: has only one of its two LoRA matrices"]
    out_features, in_features = weight.shape[:2]
    problems = []
    if down.shape[1] != in_features:
        problems.append(f"{name}: down matrix takes {down.shape[1]} inputs, the layer has {in_features}")
    if up.shape[0] != out_features:
        problems.append(f"{name}: up matrix gives {up.shape[0]} outputs, the layer has {out_features}")
    if up.shape[1] != down.shape[0]:
        problems.append(f"{name}: ranks differ (down {down.shape[0]}, up {up.shape[1]})")
    return problems


def _lycoris_shapes(parts: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """(outputs, inputs × kernel) of the update(s) a LoHa module's two products or a LoKr module's Kronecker product
    build; none for Tucker factors and other LyCORIS kinds (not checked)."""
    def product(a: str, b: str, full: str = "") -> tuple[int, int] | None:
        if full in parts:
            return parts[full].shape[0], parts[full][0].numel()
        return (parts[a].shape[0], parts[b][0].numel()) if a in parts and b in parts else None

    if any(t in parts for t in (".hada_t1", ".hada_t2", ".lokr_t2")):
        return []
    if ".hada_w1_a" in parts:  # the Hadamard product: both low-rank products have the layer's shape
        return [s for s in (product(".hada_w1_a", ".hada_w1_b"), product(".hada_w2_a", ".hada_w2_b")) if s]
    w1, w2 = product(".lokr_w1_a", ".lokr_w1_b", ".lokr_w1"), product(".lokr_w2_a", ".lokr_w2_b", ".lokr_w2")
    return [(w1[0] * w2[0], w1[1] * w2[1])] if w1 and w2 else []


def layer_names(pipe, family: Family) -> dict[str, torch.nn.Module]:
    """Every name a consumer may use for each adaptable layer of the base model."""
    recipe = family.load_recipe()
    renames = getattr(recipe, "kohya_renames", {})
    names: dict[str, torch.nn.Module] = {}
    for component in (recipe.denoiser, *TEXT_ENCODERS):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        prefix = KOHYA_PREFIXES.get(component)
        for renamed_from, renamed_to in renames.items():
            prefix = prefix and prefix.replace(renamed_from, renamed_to)
        for path, layer in _adaptable(model):
            names[f"{component}.{path}"] = layer
            if component in TEXT_ENCODERS:  # transformers v5 dropped CLIP's `text_model.` level; files keep it
                path = path if path.startswith("text_model.") else f"text_model.{path}"
                names[f"{component}.{path}"] = layer
            if prefix:
                names[prefix + path.replace(".", "_")] = layer
        if component == "unet":
            for ldm_path, layer in _ldm_layers(model).items():
                names[KOHYA_PREFIXES["unet"] + ldm_path.replace(".", "_")] = layer
    return names


def _adaptable(model: torch.nn.Module):
    """(path, layer) of the layers LoRA adapts (a peft-wrapped layer under its base path)."""
    for path, layer in model.named_modules():
        base = getattr(layer, "base_layer", None)
        if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            yield path, base
        elif isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and not path.endswith(PEFT_PARTS):
            yield path, layer


def _ldm_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """LDM path → layer, for the layers whose LDM name diffusers' own single-file conversion maps back to them."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from studio.models.ldm_layout import unet_to_ldm

    layers = dict(_adaptable(unet))
    shapes = {key.replace(".base_layer.", "."): value.shape for key, value in unet.state_dict().items()
              if ".lora_" not in key}  # the base model's tensors, without peft's wrapping
    keys = list(shapes)
    # Each tensor stands in as its index, broadcast to the real shape (no memory): where it comes back tells the
    # mapping.
    tagged = {key: torch.tensor(float(i)).expand(shapes[key]) for i, key in enumerate(keys)}
    try:
        ldm = unet_to_ldm(tagged, dict(unet.config))
    except ValueError:  # a UNet layout the LDM naming does not cover: its files use diffusers names
        return {}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    ldm_path = {int(value.reshape(-1)[0]): key.removeprefix("model.diffusion_model.").removesuffix(".weight")
                for key, value in ldm.items()}
    index = {key: i for i, key in enumerate(keys)}
    return {ldm_path[index[key]]: layers[path] for path in layers
            if (value := back.get(key := f"{path}.weight")) is not None and int(value.reshape(-1)[0]) == index[key]}
