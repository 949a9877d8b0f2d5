"""Per task: build the trainable model on the meta device as the engine would, and a forward pass that returns the
loss. The planner traces it (studio/plan/trace.py) for activation bytes and FLOPs, and counts its parameters."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

from studio.compute_dtype_norms import norms_in_compute_dtype
from studio.families import get_family
from studio.plan.models import (ModelSource, build_image_components, build_llm, image_source, llm_source,
                                param_count)
from studio.plan.trace import Trace, count_flops, trace_saved
from studio.tasks import IMAGE_TASK


@dataclass(frozen=True)
class Shape:
    """What the built model depends on (the length is traced separately: one build serves every notch)."""
    family: str
    base_model: str
    rank: int
    targets: tuple[str, ...] | None
    train_text_encoder: bool
    dtype: torch.dtype
    allow_unsafe_pickle: bool = False  # the run's opt-in for a .ckpt base: its family is read by loading it


@dataclass(frozen=True)
class Built:
    """The trainable model on the meta device and what it takes to run it."""
    source: ModelSource
    frozen: dict[str, int]  # component → parameter count
    lora_params: int
    quantizable: int  # weights of the LLM decoder's / the image denoiser's linear layers: what 4-bit quantizes
    text_elements: int  # images: numbers in one caption's cached text embedding (tokens × width)
    model: torch.nn.Module
    run: Callable[[int], torch.Tensor]  # forward at a resolution / max_length, returning the loss
    checkpointing: Callable[[torch.nn.Module, Callable], None]


@lru_cache(maxsize=8)
def build(shape: Shape) -> Built:
    return _build_image(shape) if get_family(shape.family).task == IMAGE_TASK else _build_llm(shape)


@lru_cache(maxsize=128)
def trace(shape: Shape, length: int) -> Trace:
    built = build(shape)
    return trace_saved(built.model, lambda: built.run(length), built.checkpointing)


@lru_cache(maxsize=32)
def flops(shape: Shape, length: int) -> int:
    """Forward + backward FLOPs of one sample (a few seconds for full-size models: on demand only)."""
    built = build(shape)
    return count_flops(lambda: built.run(length))


# --- images (every registered image family; the recipe knows its denoiser's inputs) ----------------------------------

def _build_image(shape: Shape) -> Built:
    from peft import LoraConfig

    from studio.models import vae_scale_factor

    family = get_family(shape.family)
    recipe = family.load_recipe()
    source = image_source(shape.base_model, family, allow_unsafe_pickle=shape.allow_unsafe_pickle)
    parts = build_image_components(source)
    frozen = {name: param_count(module) for name, module in parts.items()}
    denoiser, vae = parts[recipe.denoiser], parts["vae"]
    encoders = [m for name, m in parts.items() if name.startswith("text_encoder")]
    quantizable = _linear_weights(denoiser)
    lora = dict(r=shape.rank, lora_alpha=shape.rank, init_lora_weights="gaussian")
    denoiser.add_adapter(LoraConfig(target_modules=list(shape.targets or recipe.targets), **lora))
    trained = [denoiser]
    if shape.train_text_encoder:
        for encoder in encoders:
            encoder.add_adapter(LoraConfig(target_modules=list(recipe.text_encoder_targets), **lora))
            trained.append(encoder)
    lora_params = sum(p.numel() for m in trained for p in m.parameters() if p.requires_grad)
    for module in trained:
        module.to(shape.dtype).train()
    _as_the_loop_runs(trained, shape.dtype)

    scale = vae_scale_factor(vae.config)
    tokens, width = recipe.text_shape(denoiser)

    def run(resolution: int) -> torch.Tensor:
        if shape.train_text_encoder:
            ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
            embeds = torch.cat([enc(ids, output_hidden_states=True).hidden_states[-2] for enc in trained[1:]], -1)
        else:
            embeds = _meta(1, tokens, width, dtype=shape.dtype)
        pred = denoiser(**recipe.meta_inputs(denoiser, resolution // scale, embeds, shape.dtype),
                        return_dict=False)[0]
        pred = torch.stack(pred) if isinstance(pred, list) else pred  # Z-Image: one output per image
        return F.mse_loss(pred.float(), torch.empty_like(pred, dtype=torch.float32))

    def checkpointing(model, func):
        model.enable_gradient_checkpointing(gradient_checkpointing_func=func)
        for encoder in trained[1:]:
            _transformers_checkpointing(encoder, func)

    return Built(source, frozen, lora_params, quantizable, tokens * width, denoiser, run, checkpointing)


# --- causal LMs ------------------------------------------------------------------------------------------------------

def _build_llm(shape: Shape) -> Built:
    from peft import LoraConfig, get_peft_model

    from studio.engines.llm import target_modules
    from studio.llm_loss import causal_lm_loss

    source = llm_source(shape.base_model)
    model = build_llm(source)
    frozen = {"model": param_count(model)}
    tables = {m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    quantizable = _linear_weights(model) - sum(m.weight.numel() for m in tables if isinstance(m, torch.nn.Linear))
    targets = target_modules(model, list(shape.targets) if shape.targets else None)
    model = get_peft_model(model, LoraConfig(r=shape.rank, lora_alpha=shape.rank, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.to(shape.dtype).train()
    _as_the_loop_runs([model], shape.dtype)

    def run(length: int) -> torch.Tensor:
        ids = torch.zeros(1, length, dtype=torch.long, device="meta")
        # A ready 4-D mask: transformers' mask building reads values, which meta tensors do not have.
        mask = torch.ones(1, 1, length, length, dtype=torch.bool, device="meta")
        return causal_lm_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": ids})  # the engine's loss

    return Built(source, frozen, lora_params, quantizable, 0, model, run, _transformers_checkpointing)


def _as_the_loop_runs(trained: list[torch.nn.Module], dtype: torch.dtype) -> None:
    """The norms the training loop runs in the compute dtype under autocast (16-bit runs), swapped the same way."""
    if dtype != torch.float32:
        norms_in_compute_dtype(trained, dtype)


def _transformers_checkpointing(model: torch.nn.Module, func: Callable) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module._gradient_checkpointing_func = func


def _linear_weights(model: torch.nn.Module) -> int:
    """Weights of the linear layers: what 4-bit loading quantizes (an LLM's output table is left out by the caller)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _meta(*size: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*size, dtype=dtype, device="meta")

