"""Image preview: base model + LoRA adapters at chosen strengths → images, and strength × checkpoint sweeps.

`render` is shared by the training loop's sample images and by the studio's Preview tab; `ImagePreviewer` keeps
one base pipeline loaded and mixes adapters: LoRAs through diffusers' `load_lora_weights` / `set_adapters`, LyCORIS
files (LoHa, LoKr, DoRA, LoCon) through lycoris-lora's modules hooked onto the base layers, each at its strength.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from studio.errors import StudioError
from studio.families import Family, all_families, family_of_pipeline_class
from studio.hardware import inference_dtype, pick_device
from studio.models.pipelines import load_pipeline
from studio.preview.sweep_grid import SWEEP_STRENGTHS, GridLayout, draw_grid
from studio.tasks import IMAGE_TASK

MAX_LOADED_LORAS = 12  # kept in the pipeline (a sweep loads one per checkpoint); the least recently used go first


def render(pipe: DiffusionPipeline, prompt: str, *, negative_prompt: str = "", seed: int = 0, steps: int | None = None,
           width: int | None = None, height: int | None = None, guidance_scale: float | None = None,
           embeds: dict | None = None) -> Image.Image:
    """One image, reproducible from `seed` (the generator lives on the CPU so every device draws the same noise).
    Steps and guidance left None take the family's defaults (e.g. Flux.1 schnell: 4 steps, no guidance). `embeds`:
    the prompt already encoded (the family recipe's `prompt_inputs`), so no text encoder needs to be on the card."""
    family = family_of_pipeline_class(type(pipe).__name__)
    settings = family.load_recipe().sampling(pipe)
    if steps is not None:
        settings["num_inference_steps"] = int(steps)
    if guidance_scale is not None:
        settings["guidance_scale"] = float(guidance_scale)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    text = embeds if embeds is not None else {"prompt": prompt, "negative_prompt": negative_prompt or None}
    return pipe(**text, width=width, height=height, generator=generator, **settings).images[0]


class ImagePreviewer:
    """Keeps the last base model loaded; adapters are loaded once each and mixed by strength."""

    def __init__(self, device: torch.device | None = None):
        self.device = device or pick_device()
        self._lock = threading.RLock()  # one generation (or sweep) at a time per previewer: the pipeline is stateful
        self._base: str | None = None
        self._pipe: DiffusionPipeline | None = None
        self._adapters: dict[str, str] = {}  # adapter file path -> its name in the pipeline; most recently used last
        self._loaded = 0  # LoRAs loaded so far: each gets a new name
        self._lycoris: dict[str, list] = {}  # LyCORIS file path -> its modules, hooked onto the pipeline's layers

    def generate(self, base_model: str, adapters: list[tuple[str, float]], prompt: str, negative_prompt: str = "",
                 seed: int = 0, steps: int | None = None, width: int | None = None,
                 height: int | None = None, allow_unsafe_pickle: bool = False) -> Image.Image:
        """`allow_unsafe_pickle`: a run trained on this .ckpt base opted in (studio.models.single_file)."""
        with self._lock:
            pipe = self._pipeline(base_model, allow_unsafe_pickle)
            self._activate(pipe, adapters)
            return render(pipe, prompt, negative_prompt=negative_prompt, seed=seed, steps=steps, width=width,
                          height=height)

    def strength_sweep(self, base_model: str, checkpoints: list[tuple[str, str]], prompt: str,
                       negative_prompt: str = "", seed: int = 0, steps: int | None = None, width: int | None = None,
                       height: int | None = None, strengths: tuple[float, ...] = SWEEP_STRENGTHS,
                       on_tile: Callable[[int, int], None] | None = None,
                       allow_unsafe_pickle: bool = False) -> tuple[Image.Image, GridLayout]:
        """One seed for every (checkpoint, strength): `checkpoints` are (label, adapter file) pairs, one row each;
        strengths across (0 = the base model). `on_tile(done, total)` follows the progress."""
        tiles, done, total = [], 0, len(checkpoints) * len(strengths)
        with self._lock:  # the whole grid from one base model, even if another sweep waits
            for _, adapter in checkpoints:
                tiles.append([])
                for strength in strengths:
                    tiles[-1].append(self.generate(base_model, [(adapter, strength)], prompt, negative_prompt, seed,
                                                   steps, width, height, allow_unsafe_pickle))
                    done += 1
                    if on_tile:
                        on_tile(done, total)
        return draw_grid(tiles, [label for label, _ in checkpoints], strengths)

    def _pipeline(self, base_model: str, allow_unsafe_pickle: bool = False) -> DiffusionPipeline:
        if self._base != base_model:
            self._pipe, self._family = load_pipeline(base_model, allow_unsafe_pickle=allow_unsafe_pickle,
                                                     torch_dtype=inference_dtype(self.device))
            self._pipe.to(self.device)
            self._pipe.set_progress_bar_config(disable=True)
            self._base, self._adapters, self._lycoris = base_model, {}, {}
        return self._pipe

    def _activate(self, pipe: DiffusionPipeline, adapters: list[tuple[str, float]]) -> None:
        for path, _ in adapters:
            key = str(Path(path).resolve())
            if key not in self._adapters and key not in self._lycoris:
                if not Path(key).is_file():
                    raise StudioError(f"Adapter file {path} does not exist. Pick a finished run's .safetensors.")
                _check_adapter_family(Path(key), self._family)
                try:
                    if _is_lycoris(Path(key)):
                        self._lycoris[key] = _hook_lycoris(pipe, self._family, Path(key))
                    else:
                        name, self._loaded = f"adapter_{self._loaded}", self._loaded + 1
                        pipe.load_lora_weights(key, adapter_name=name)
                        self._adapters[key] = name
                except (ValueError, KeyError, RuntimeError) as exc:  # e.g. torch's many-line size mismatch list
                    raise StudioError(f"{Path(path).name} does not fit this base model "
                                      f"({str(exc).strip().splitlines()[0][:200]}). Pick an adapter trained on the "
                                      "same model family.") from None
        strengths = {str(Path(p).resolve()): float(w) for p, w in adapters}
        for key, modules in self._lycoris.items():
            for module in modules:
                module.strength = strengths.get(key, 0.0)
        self._unload_idle(pipe, strengths)
        # Only the requested LoRAs run: a sweep loads many checkpoints, and each active one costs compute.
        active = [key for key in self._adapters if key in strengths]
        if active:
            pipe.enable_lora()
            pipe.set_adapters([self._adapters[key] for key in active], [strengths[key] for key in active])
        elif self._adapters:
            pipe.disable_lora()

    def _unload_idle(self, pipe: DiffusionPipeline, requested: dict[str, float]) -> None:
        """Unload the least recently used LoRAs beyond MAX_LOADED_LORAS: each holds its weights in (GPU) memory."""
        for key in requested:
            if key in self._adapters:
                self._adapters[key] = self._adapters.pop(key)  # now the most recently used
        idle = [key for key in self._adapters if key not in requested]
        for key in idle[:max(0, len(self._adapters) - MAX_LOADED_LORAS)]:
            pipe.delete_adapters(self._adapters.pop(key))


def _is_lycoris(path: Path) -> bool:
    """A file diffusers cannot load as a LoRA: LyCORIS tensors, or the LyCORIS network module (LoCon) in its header."""
    from safetensors import safe_open

    from studio.export.kohya import LYCORIS_TENSORS

    with safe_open(str(path), framework="pt") as f:
        keys, header = list(f.keys()), f.metadata() or {}
    return (header.get("ss_network_module") == "lycoris.kohya"
            or any(key.endswith(tuple(f".{t}" for t in (*LYCORIS_TENSORS, "dora_scale"))) for key in keys))


def _hook_lycoris(pipe: DiffusionPipeline, family: Family, path: Path) -> list:
    """lycoris-lora's module for each layer the file adapts, hooked onto the pipeline's layer (found under the names
    the export self-test resolves)."""
    from lycoris.modules import get_module, make_module
    from safetensors.torch import load_file

    from studio.export.selftest import layer_names

    weights, layers = load_file(str(path)), layer_names(pipe, family)
    modules = []
    for name in dict.fromkeys(key.split(".")[0] for key in weights):
        if name not in layers:
            raise KeyError(f"no layer {name}")
        kind, params = get_module(weights, name)
        module = make_module(kind, params, name, layers[name]) if kind else None
        if module is None:
            raise ValueError(f"{name} is not a LyCORIS module this version of lycoris-lora reads")
        module.to(layers[name].weight.device, layers[name].weight.dtype)
        module.apply_to()
        _blend_by_strength(layers[name], module)
        modules.append(module)
    return modules


def _blend_by_strength(layer: torch.nn.Module, module) -> None:
    """Strength s moves the layer's weight from the base (0) to the adapted one (1), as A1111 and ComfyUI apply
    LyCORIS files; that is also right for DoRA, whose own multiplier would rescale the base at 0. The layers are
    linear in their weight, so blending the two outputs is the same."""
    adapted, base = layer.forward, module.org_forward
    module.multiplier, module.strength = 1.0, 0.0

    def forward(x, *args, **kwargs):
        if module.strength == 0:
            return base(x, *args, **kwargs)
        out = adapted(x, *args, **kwargs)
        return out if module.strength == 1 else torch.lerp(base(x, *args, **kwargs), out, module.strength)

    layer.forward = forward


def _check_adapter_family(path: Path, base: Family) -> None:
    """A LoRA made for another family fails loudly here, not as an unchanged image (diffusers skips unknown keys)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys, header = list(f.keys()), f.metadata() or {}
    def made_for(family: Family) -> bool:
        return any(key.startswith(family.lora_markers) for key in keys)

    # The header says which family when the keys cannot (SD1.5 and SDXL LoRAs share their key names).
    version = header.get("studio_model_family") or header.get("ss_base_model_version")
    named = next((f for f in all_families(IMAGE_TASK) if version in (f.name, f.webui_version)), None)
    if named is not None and named != base:
        other = named
    elif made_for(base):
        return
    else:
        other = next((f for f in all_families(IMAGE_TASK) if f.lora_markers and made_for(f)), None)
    if other is not None:
        raise StudioError(f"{path.name} is a LoRA for {other.label}, but the base model is {base.label}. Pick a "
                          f"{other.label} base model, or an adapter trained on {base.label}.")
