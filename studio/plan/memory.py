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
from studio.plan.terms import train_terms
from studio.plan.report import CONTEXT_ROW, GB, MemoryPlan, PlanRow, count_text

CUDA_CONTEXT_GB = 0.6  # CUDA context, cuBLAS/cuDNN workspaces: outside torch's allocator statistics
NF4_BYTES = 0.5 + 0.5 / 64 + 4 / (64 * 256)  # 4-bit weights, 8-bit absmax per 64, fp32 per 256 absmax (double quant)
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
                  cfg.train_text_encoder and cfg.is_image, dtype)
    found, trace = probes.build(shape), probes.trace(shape, length)
    size = torch.finfo(dtype).bits // 8
    rows = _weight_rows(cfg, family, found, size, on_gpu)
    lora = found.lora_params
    # Several processes: the gradients are summed through one flat fp32 buffer beside them.
    grads = 2 if cfg.num_processes > 1 else 1
    rows.append(PlanRow("LoRA weights + gradients", lora * 4 * (1 + grads) / GB,
                        f"{count_text(lora)} parameters, fp32" + (", + all-reduce buffer" if grads > 1 else "")))
    rows.append(PlanRow("optimizer state", lora * OPTIMIZER_BYTES[cfg.optimizer] / GB, cfg.optimizer))
    unit = "px" if cfg.is_image else "tokens"
    ckpt = "with" if cfg.gradient_checkpointing else "without"
    rows.append(PlanRow("activations", trace.activations(cfg.gradient_checkpointing) * cfg.batch_size / GB,
                        f"micro-batch {cfg.batch_size} at {length} {unit}, {ckpt} gradient checkpointing"))
    rows.append(PlanRow("backward working set", trace.backward_peak() * cfg.batch_size / GB,
                        "gradients of one block's activations"))
    rows += train_terms(cfg, shape, length, found, trace, on_gpu)  # what the trace does not see (terms.py)
    captions = _image_count(cfg) if cfg.is_image and not cfg.train_text_encoder else 0
    if captions:  # frozen text encoders: each caption's embedding is cached on the device (latents stay in RAM)
        rows.append(PlanRow("cached text embeddings", captions * found.text_elements * size / GB,
                            f"up to {captions} captions"))
    if on_gpu:
        rows.append(PlanRow(CONTEXT_ROW, CUDA_CONTEXT_GB, "context and cuBLAS/cuDNN workspaces (not in torch's "
                                                          "allocated memory)"))
    return MemoryPlan(rows, card_gb, found.source.note, probes.flops(shape, length) if flops else None)


def _weight_rows(cfg: RunConfig, family: str, found: Built, size: int, on_gpu: bool) -> list[PlanRow]:
    """Frozen weights at the dtype the engine stores them in."""
    dtype_name = {4: "fp32", 2: "bf16" if cfg.mixed_precision == "bf16" else "fp16"}[size]
    if not cfg.is_image:
        total = found.frozen["model"]
        # distributed: fsdp splits the frozen base over the GPUs; each holds its share (ddp: the whole model each)
        shards = cfg.num_processes if cfg.distributed == "fsdp" else 1
        where = f", a 1/{shards} shard per GPU" if shards > 1 else ""
        if cfg.load_in_4bit:
            rest = total - found.quantizable
            # peft's k-bit preparation upcasts the unquantized weights to fp32; under autocast the engine puts the
            # embedding tables back to 16-bit, so only the norms stay fp32 (a few MB).
            tables = found.embeddings if size == 2 else 0
            return [PlanRow("weights, 4-bit layers", found.quantizable * NF4_BYTES / GB / shards,
                            f"{count_text(found.quantizable)} parameters in NF4{where}"),
                    PlanRow("weights, embeddings + norms", (tables * size + (rest - tables) * 4) / GB / shards,
                            f"{count_text(rest)} parameters, embeddings {dtype_name}, norms fp32{where}")]
        return [PlanRow("weights", total * size / GB / shards, f"{count_text(total)} parameters, {dtype_name}{where}")]
    recipe = get_family(family).load_recipe()
    rows = []
    for name, params in found.frozen.items():
        if name == recipe.denoiser and cfg.load_in_4bit:
            rest = params - found.quantizable
            rows.append(PlanRow(f"{name} weights", (found.quantizable * NF4_BYTES + rest * size) / GB,
                                f"{count_text(found.quantizable)} linear weights in NF4 (computed in {dtype_name}), "
                                f"{count_text(rest)} others {dtype_name}"))
        elif name == recipe.denoiser and cfg.fp8_base:
            rows.append(PlanRow(f"{name} weights", params / GB, f"{count_text(params)} parameters, fp8 (computed in "
                                                                 f"{dtype_name})"))
        elif name.startswith("text_encoder") and recipe.offload_encoders and on_gpu and not cfg.shuffle_tags:
            # Flux's T5: on the card only while the captions are encoded, before the first step.
            rows.append(PlanRow(f"{name} weights", 0.0, f"{count_text(params)} parameters, {dtype_name} "
                                                        f"({params * size / GB:.1f} GB): off the card once the "
                                                        "captions are cached"))
        else:
            vae = name == "vae"  # the engine keeps the VAE in fp32: SD VAEs overflow in fp16
            rows.append(PlanRow(f"{name} weights", params * (4 if vae else size) / GB,
                                f"{count_text(params)} parameters, {'fp32' if vae else dtype_name}"))
    return rows


def _image_count(cfg: RunConfig) -> int:
    folder = Path(cfg.train_data_dir)
    return len(list_images(folder)) if folder.is_dir() else 0
