"""The memory plan of a run: one row per thing the card holds, before any weight is loaded.

Parameter counts come from the model built on the meta device from its configs; activations from tracing one
micro-batch there (studio/plan/trace.py). Rows: frozen weights at their storage dtype, LoRA weights, gradients and
optimizer state, activations of one micro-batch (with or without gradient checkpointing), the backward pass's
working set, cached text embeddings, and the CUDA context. The verdict compares the sum with the card.
The plan is per GPU: with num_processes > 1 each GPU holds its own micro-batch of batch_size (and, under
distributed: fsdp, its shard of an LLM's frozen weights).
"""

from __future__ import annotations

from pathlib import Path

import torch

from studio.config import RunConfig
from studio.data.captions import list_images
from studio.families import get_family
from studio.hardware import HALF_DTYPES, storage_dtype
from studio.plan import probes
from studio.plan.probes import Built, Shape
from studio.plan.phases import PhaseInputs, phase_rows, run_residency, train_weight_rows
from studio.plan.terms import train_terms
from studio.plan.report import CONTEXT_ROW, GB, MemoryPlan, PlanRow, count_text
from studio.block_swap import IN_FLIGHT
from studio.residency import NF4_BYTES, Residency, module_bytes

CUDA_CONTEXT_GB = 0.6  # CUDA context, cuBLAS/cuDNN workspaces: outside torch's allocator statistics
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}  # state per trained parameter


def weight_dtype(cfg: RunConfig, on_gpu: bool) -> torch.dtype:
    """The dtype the engines store frozen weights in (and the trace runs in). 'auto' on a GPU counts as 16-bit:
    bf16 and fp16 take the same bytes."""
    precision = "bf16" if cfg.mixed_precision == "auto" else cfg.mixed_precision
    return storage_dtype(HALF_DTYPES.get(precision), "cuda" if on_gpu else "cpu")


def plan_memory(cfg: RunConfig, family: str, card_gb: float | None, *, flops: bool = False) -> MemoryPlan:
    """The memory plan of `cfg` (a registered family's name) on a card of `card_gb` (None: CPU)."""
    on_gpu = card_gb is not None
    dtype = weight_dtype(cfg, on_gpu)
    length = cfg.resolution if cfg.is_image else cfg.max_length
    shape = Shape(family, cfg.base_model, cfg.lora_rank, tuple(cfg.target_modules) if cfg.target_modules else None,
                  cfg.train_text_encoder and cfg.is_image, dtype, cfg.allow_unsafe_pickle)
    found, trace = probes.build(shape), probes.trace(shape, length)
    size = torch.finfo(dtype).bits // 8
    residency = (run_residency(cfg, family, found.source.folder, dtype, card_gb, CUDA_CONTEXT_GB)
                 if cfg.is_image and on_gpu else None)  # the CPU holds every component in RAM at once
    rows = _weight_rows(cfg, family, found, size, residency)
    lora = found.lora_params
    # Several processes: the gradients are summed through one flat fp32 buffer beside them.
    grads = 2 if cfg.num_processes > 1 else 1
    rows.append(PlanRow("LoRA weights + gradients", lora * 4 * (1 + grads) / GB,
                        f"{count_text(lora)} parameters, fp32" + (", + all-reduce buffer" if grads > 1 else "")))
    rows.append(PlanRow("optimizer state", lora * OPTIMIZER_BYTES[cfg.optimizer] / GB, cfg.optimizer))
    unit = "px" if cfg.is_image else "tokens"
    ckpt = "with" if cfg.gradient_checkpointing else "without"
    rows.append(PlanRow("activations", _activations(cfg, trace) * cfg.batch_size / GB,
                        f"micro-batch {cfg.batch_size} at {length} {unit}, {ckpt} gradient checkpointing"
                        + (", layer inputs offloaded" if _offloads(cfg) else "")))
    rows.append(PlanRow("backward working set", trace.backward_peak() * cfg.batch_size / GB,
                        "gradients of one block's activations"))
    rows += train_terms(cfg, shape, length, found, trace, on_gpu)  # what the trace does not see (terms.py)
    captions = _image_count(cfg) if cfg.is_image and not cfg.train_text_encoder else 0
    if captions:  # frozen text encoders: each caption's embedding is cached on the device (latents stay in RAM)
        rows.append(PlanRow("cached text embeddings", captions * found.text_elements * size / GB,
                            f"up to {captions} captions"))
    phases = []
    if residency is not None:
        lora_gb = sum(row.gb for row in rows if row.name in ("LoRA weights + gradients", "optimizer state"))
        text_gb = sum(row.gb for row in rows if row.name == "cached text embeddings")
        inputs = PhaseInputs(lora_gb, text_gb, sum(row.gb for row in rows), trace.backward_peak() / GB,
                             cfg.batch_size, lora * 4 / GB)
        phases = phase_rows(residency, inputs, length)
    if on_gpu:
        rows.append(PlanRow(CONTEXT_ROW, CUDA_CONTEXT_GB, "context and cuBLAS/cuDNN workspaces (not in torch's "
                                                          "allocated memory)"))
    return MemoryPlan(rows, card_gb, found.source.note, probes.flops(shape, length) if flops else None, phases)


def _offloads(cfg: RunConfig) -> bool:
    return cfg.offload_activations and cfg.gradient_checkpointing and not cfg.is_image


def _activations(cfg: RunConfig, trace) -> int:
    """Bytes of one sample's activations. Offloaded checkpointing (studio.activation_offload) keeps two layer
    inputs on the card, not every one: the one the backward recomputes and the next, arriving."""
    if not _offloads(cfg):
        return trace.activations(cfg.gradient_checkpointing)
    units = max(len(trace.unit_saved), 1)
    return trace.outside + min(2, units) * trace.unit_inputs // units + max(trace.unit_saved, default=0)


def _weight_rows(cfg: RunConfig, family: str, found: Built, size: int,
                 residency: Residency | None) -> list[PlanRow]:
    """Frozen weights at the dtype the engine stores them in."""
    dtype_name = {4: "fp32", 2: "bf16" if cfg.mixed_precision == "bf16" else "fp16"}[size]
    if not cfg.is_image:
        total = found.frozen["model"]
        # distributed: fsdp splits the frozen base over the GPUs; each holds its share (ddp: the whole model each)
        shards = cfg.num_processes if cfg.distributed == "fsdp" else 1
        where = f", a 1/{shards} shard per GPU" if shards > 1 else ""
        if cfg.load_in_4bit:
            rest = total - found.quantizable  # at the storage dtype (the engine upcasts none of them)
            return [PlanRow("weights, 4-bit layers", found.quantizable * NF4_BYTES / GB / shards,
                            f"{count_text(found.quantizable)} parameters in NF4{where}"),
                    PlanRow("weights, embeddings + norms", rest * size / GB / shards,
                            f"{count_text(rest)} parameters, {dtype_name}{where}")]
        return [PlanRow("weights", total * size / GB / shards, f"{count_text(total)} parameters, {dtype_name}{where}")]
    return _image_weight_rows(cfg, family, found, size, dtype_name, residency)


def _image_weight_rows(cfg: RunConfig, family: str, found: Built, size: int, dtype_name: str,
                       residency: Residency | None) -> list[PlanRow]:
    """Each component's weights as the train phase holds them (from the residency ledger; on the CPU, all of
    them: system RAM holds every component at once)."""
    recipe = get_family(family).load_recipe()
    notes = {}
    for name, params in found.frozen.items():
        dtype = "fp32" if name == "vae" else dtype_name  # the engine keeps the VAE in fp32: SD VAEs overflow in fp16
        notes[name] = f"{count_text(params)} parameters, {dtype}"
    denoiser = recipe.denoiser
    if cfg.load_in_4bit:
        notes[denoiser] = (f"{count_text(found.frozen[denoiser])} parameters, linear weights in NF4 (computed in "
                           f"{dtype_name})")
    elif cfg.fp8_base:
        notes[denoiser] = f"{count_text(found.frozen[denoiser])} parameters, fp8 (computed in {dtype_name})"
    if residency is None:
        def stored(name: str, params: int) -> float:
            if name == denoiser and cfg.load_in_4bit:
                return found.quantizable * NF4_BYTES + (params - found.quantizable) * size
            return params * (1 if name == denoiser and cfg.fp8_base else 4 if name == "vae" else size)
        return [PlanRow(f"{name} weights", stored(name, params) / GB, notes[name])
                for name, params in found.frozen.items()]
    if residency.swapped:
        nf4 = residency.decisions.storage == "nf4"
        off = sum(module_bytes(block, nf4) for block in residency.swapped) / GB
        notes[denoiser] += (f"; {len(residency.swapped)} of {len(residency.blocks)} blocks in CPU memory "
                            f"({off:.1f} GB), {IN_FLIGHT} on the card at a time")
    return train_weight_rows(residency, notes)


def _image_count(cfg: RunConfig) -> int:
    folder = Path(cfg.train_data_dir)
    return len(list_images(folder)) if folder.is_dir() else 0
