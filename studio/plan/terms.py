"""What the training step holds that the meta-device trace does not see: named plan rows, each with its formula.

Checked against peaks measured on an H200 (tests/fixtures/gpu_measured.json, tests/test_plan_truth.py). The
trace counts what autograd saves in a 16-bit model; on the card the step also holds
- autocast's casts: fp32 copies around norms, softmax and losses, 16-bit copies for each matmul reading them
  (traced again under autocast's rules: studio/plan/autocast_trace.py), and the 16-bit LoRA weights the matmuls
  read (studio/master_weights.py's compute copy and its gradients);
- the LM loss: the logits' fp32 gradient and log-softmax gradient at the start of backward (or one chunk of them
  where studio.llm_loss runs the loss in chunks);
- 4-bit LLMs: bitsandbytes dequantizes each 4-bit layer to 16-bit for its matmul (the engine keeps the norms
  16-bit, so the hidden states stay 16-bit, unlike peft's k-bit preparation);
- cuBLAS's workspace, which torch allocates through its own allocator.
cuDNN's convolution workspaces are transient and chosen per kernel; the measured image peaks sit inside the
planned ones without a row for them (the fit's 8 % margin covers the allocator's fragmentation).
"""

from __future__ import annotations

import torch

from studio.config import RunConfig
from studio.llm_loss import chunk_bytes, why_not_chunked
from studio.plan.autocast_trace import trace_autocast
from studio.plan.probes import Built, Shape
from studio.plan.report import GB, PlanRow
from studio.plan.trace import Trace
from studio.plan.weight_trace import saved_weight_bytes

CUBLAS_WORKSPACE = 8 * 4 * 2**20  # torch's default CUBLAS_WORKSPACE_CONFIG on Hopper and newer (4 MiB before)
FP32 = 4


def train_terms(cfg: RunConfig, shape: Shape, length: int, found: Built, trace: Trace, on_gpu: bool) -> list[PlanRow]:
    """The rows the train phase adds to the traced plan (rows of zero bytes are left out)."""
    if not on_gpu:
        return []  # what the card holds beyond the trace; system RAM plans stay as traced
    autocast = shape.dtype != torch.float32  # the engines autocast whenever they store 16-bit weights
    size = torch.finfo(shape.dtype).bits // 8
    rows = []
    if autocast:
        rows += _autocast_rows(cfg, shape, length, found, trace, size)
    if not cfg.is_image:
        rows.append(_lm_loss_row(cfg, length, found, trace, size))
    if cfg.load_in_4bit:
        rows.append(_dequantized_row(found, size))
    if cfg.fp8_base and cfg.is_image:
        rows.append(_fp8_copies_row(cfg, shape, length, size))
    rows.append(PlanRow("cuBLAS workspace", CUBLAS_WORKSPACE / GB, "torch allocates it on the first matmul",
                        "8 × 4 MiB (CUBLAS_WORKSPACE_CONFIG default on Hopper+; 2 × 4 MiB before)"))
    return [row for row in rows if row.gb > 0]


def _autocast_rows(cfg: RunConfig, shape: Shape, length: int, found: Built, trace: Trace, size: int) -> list[PlanRow]:
    cast = trace_autocast(shape, length)
    ckpt = cfg.gradient_checkpointing
    extra = (cast.activations(ckpt) + cast.backward_peak() - trace.activations(ckpt) - trace.backward_peak())
    return [PlanRow("autocast copies of activations", max(0, extra) * cfg.batch_size / GB,
                    "fp32 norms and losses, 16-bit copies for matmuls",
                    "(saved bytes traced under autocast's cast rules − traced without) × micro-batch"),
            _lora_copy_row(cfg, found, size)]


def _lora_copy_row(cfg: RunConfig, found: Built, size: int) -> PlanRow:
    """The matmuls read 16-bit LoRA weights: studio/master_weights.py's compute copy of the fp32 masters and the
    16-bit gradients autograd gives it (alive until gathered into the fp32 buffer after backward); under fsdp the
    parameters stay fp32 and autocast caches a 16-bit copy of each for the whole step (trainable_weights' rule)."""
    lora = found.lora_params
    if cfg.distributed == "fsdp":
        return PlanRow("autocast copies of LoRA weights", lora * size / GB, "kept by autocast for the whole step",
                       f"LoRA parameters × {size} B")
    return PlanRow("16-bit LoRA weights + gradients", lora * 2 * size / GB, "the compute copy of the fp32 masters",
                   f"LoRA parameters × 2 × {size} B")


def _lm_loss_row(cfg: RunConfig, length: int, found: Built, trace: Trace, size: int) -> PlanRow:
    """At the start of backward the loss holds its gradients beside every saved activation; the plan's working
    set (one unit's recompute and its gradients) is at another moment, so only the excess over it is added."""
    vocab = found.model.config.vocab_size
    tokens = cfg.batch_size * length
    chunk = _loss_chunk_bytes(found.model, vocab, size)
    loss = chunk if chunk is not None else 2 * tokens * vocab * FP32
    planned = (trace.backward_peak() + (max(trace.unit_saved, default=0) if cfg.gradient_checkpointing else 0))
    formula = (f"one chunk of studio.llm_loss: {chunk:,} B (logits, fp32 copy, log-softmax, gradients)" if chunk
               is not None
               else f"2 × {tokens:,} tokens × {vocab:,} vocabulary × 4 B (fp32 log-softmax gradient and logits "
                    "gradient)")
    return PlanRow("LM loss gradients", max(0, loss - planned * cfg.batch_size) / GB,
                   "fp32 gradients at the start of backward",
                   f"{formula} − backward working set (and one unit's recompute with checkpointing)")


def _loss_chunk_bytes(model: torch.nn.Module, vocab: int, size: int) -> int | None:
    """What the engine's loss holds at its peak when it runs in chunks (studio.llm_loss), else None (the model's
    own loss over the full logits)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return None if why_not_chunked(base) else chunk_bytes(vocab, size)


def _dequantized_row(found: Built, size: int) -> PlanRow:
    """bitsandbytes' matmul for many tokens dequantizes the 4-bit weight to the compute dtype first (forward, and
    again in backward for the input's gradient); one layer at a time."""
    head = found.model.get_output_embeddings() if hasattr(found.model, "get_output_embeddings") else None
    largest = max((m.weight.numel() for m in found.model.modules()
                   if isinstance(m, torch.nn.Linear) and m is not head and not m.weight.requires_grad), default=0)
    return PlanRow("4-bit layer dequantized", largest * size / GB, "bitsandbytes' matmul on a 16-bit copy",
                   f"largest 4-bit layer's {largest:,} weights × {size} B")


def _fp8_copies_row(cfg: RunConfig, shape: Shape, length: int, size: int) -> PlanRow:
    """fp8 storage (diffusers' layerwise casting) casts each layer's weights to 16-bit for its forward, and a matmul
    whose input requires grad saves that copy for backward (studio/plan/weight_trace.py): with checkpointing, the
    copies of the unit being recomputed and back-propagated; without it, every such layer's."""
    whole, unit = saved_weight_bytes(shape, length)
    where = "one checkpointed unit's" if cfg.gradient_checkpointing else "the whole pass's"
    return PlanRow("fp8 layers' 16-bit copies", (unit if cfg.gradient_checkpointing else whole) / GB,
                   "saved by autograd for backward", f"{where} frozen weights autograd saves (traced) × {size} B")
