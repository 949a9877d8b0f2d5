"""The causal LM's loss without its full logits: the LM head and cross-entropy run chunk by chunk over positions.

transformers' own loss computes every position's logits and upcasts them to fp32: tokens × vocabulary × 4 bytes,
4.2 GB at 8k tokens for a 128k vocabulary, plus a gradient of the same size. Here only the positions that carry a
label (assistant tokens by default; packing already masks each sample's first label) reach the head, a few hundred
at a time, each chunk under checkpointing, so the backward recomputes one chunk's logits at a time too. The loss is
the same mean over labelled positions (and so are the LoRA gradients, a LoRA on lm_head included). On CUDA with
liger-kernel installed and a plain linear head, liger's fused linear cross-entropy does the same in one kernel.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from studio.data.text import IGNORE

CHUNK_LOGITS = 2**24  # logits per chunk (64 MB in fp32): GEMMs large enough to keep a GPU busy
# Per logit of a chunk while its backward runs: the 16-bit logits, their fp32 copy, the saved log-softmax and the
# fp32 and 16-bit gradients.
BYTES_PER_CHUNK_LOGIT = 2 + 4 + 4 + 4 + 2
# Config fields that change logits after the head: such models keep transformers' own loss.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def chunk_tokens(vocab_size: int) -> int:
    """Positions per chunk: CHUNK_LOGITS logits (130 positions for Llama 3's 128,256-token vocabulary)."""
    return max(1, CHUNK_LOGITS // vocab_size)


def chunk_bytes(vocab_size: int, dtype_size: int) -> int:
    """What the loss holds beside the model's activations at its peak: one chunk's logits and their gradients."""
    return chunk_tokens(vocab_size) * vocab_size * (BYTES_PER_CHUNK_LOGIT - 2 + dtype_size)


def why_not_chunked(model: torch.nn.Module) -> str | None:
    """None when the chunked loss gives this causal LM's own loss; else why not (it then keeps its own)."""
    config = model.config
    changed = [name for name in LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if changed:
        return f"{config.model_type} transforms its logits ({changed[0]})"
    if model.get_output_embeddings() is None:
        return f"{config.model_type} has no output embedding"
    return None


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int | None = None,
                   labelled: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The mean next-token cross-entropy over labelled positions of `batch` (input_ids, labels, position_ids or a
    ready attention_mask; other keys go to the attention layers), as `model(**batch).loss` computes it. `model`: a
    transformers causal LM or its peft wrapper; `chunk`: positions per chunk (default: chunk_tokens of the
    vocabulary); `labelled`: labelled_positions of the labels, found on the host (else here, on the device)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state
    return chunked_loss(hidden, batch["labels"], base.get_output_embeddings(), chunk, labelled)


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The flattened positions whose next token carries a label, and those labels. Found on the host, where collate
    made the labels: on a GPU, `nonzero` would wait for every queued kernel."""
    targets = F.pad(labels, (0, 1), value=IGNORE)[:, 1:].reshape(-1)
    keep = (targets != IGNORE).nonzero().squeeze(1)
    return keep, targets[keep]


def chunked_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk: int | None = None,
                 labelled: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Cross-entropy of head(hidden[:, t]) against labels[:, t + 1], averaged over the labelled positions."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    size = chunk or chunk_tokens(head.weight.shape[0])
    if hidden.device.type == "meta":
        # The planner's shapes: every position labelled (no values to pick by), and one chunk (what a chunk holds
        # is planned from chunk_bytes; the trace sees none of it inside the checkpoint, and it runs 100× faster).
        size, targets = hidden.shape[0], F.pad(labels, (0, 1), value=IGNORE)[:, 1:].reshape(-1)
    else:
        keep, targets = labelled or labelled_positions(labels)
        hidden = hidden[keep]
    fused = _liger_loss(hidden, targets, head)
    if fused is not None:
        return fused
    total = hidden[:0].float().sum()  # zero, on the graph: a batch without labels gives NaN, as transformers does
    for start in range(0, hidden.shape[0], size):
        total = total + checkpoint(partial(_summed_loss, head), hidden[start:start + size],
                                   targets[start:start + size], use_reentrant=False)
    return total / targets.numel()


def _summed_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")  # fp32, as transformers' loss upcasts


def _liger_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor | None:
    """liger-kernel's fused linear cross-entropy on CUDA for a plain linear head; None where it does not apply
    (CPU, not installed, a LoRA-wrapped or quantized head)."""
    if hidden.device.type != "cuda" or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else head.weight.dtype
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)(head.weight.to(dtype), hidden.to(dtype), targets)
