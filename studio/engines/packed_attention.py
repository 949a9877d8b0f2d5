"""Attention for packed rows that costs what each sample costs, not what the whole row costs.

A packed row holds several samples whose positions restart at 0. transformers' sdpa path keeps them apart with a
dense (row x row) block mask, so a 2048-token row pays 2048² scores per head whatever the sample lengths. Here each
sample is attended on its own, through transformers' documented extension point (`AttentionInterface.register`):

- CUDA with half-precision weights on Ampere or newer: PyTorch's own flash varlen kernel (`varlen_attn`), which
  takes the samples end to end with their cumulative lengths — no padding, no mask, no flash-attn package.
- elsewhere (CPU, fp32): samples grouped by length (powers of two), each group one padded causal SDPA call, so a
  group wastes at most half its scores and a row never costs more than the dense mask. Rows of up to 256 tokens
  keep one block-masked call, where grouping costs more than it saves. Tiny Llama training on CPU (2 threads),
  us/token block mask vs grouped: 12 vs 16 at 128 tokens, even at 256, 23-28 vs 15-18 at 512, 73-86 vs 14-18 at 2048.

transformers builds no mask for an implementation it has no mask function for, so long rows never pay for one.
Decoding with a KV cache (sample replies) is not a packed row: it goes to transformers' own sdpa function.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from studio.hardware import is_ampere_or_newer, to_device

GROUPED = "studio_packed_grouped"
VARLEN = "studio_packed_varlen"  # no "flash" or "sdpa" in the names: transformers gives those special handling
DENSE_UP_TO = 256
SEGMENTS = "studio_segments"  # the keyword the engine passes Segments under (transformers hands it to each layer)


def choose(config: PretrainedConfig, device: torch.device) -> str | None:
    """The implementation for packed rows of this model on `device`; None keeps transformers' dense mask (models
    whose attention is more than causal: sliding windows, soft-capped logits)."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window or getattr(config, "attn_logit_softcapping", None):
        return None
    return VARLEN if is_ampere_or_newer(device) else GROUPED


def _starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, length) True where a sample starts: where the position does not continue the previous one, and at
    every row start. Padding continues the last sample: it comes after every real token of that sample, so causal
    attention never lets a real token see it."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def _segments(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length) of each sample in the flattened (batch * length) tokens."""
    batch, length = position_ids.shape
    first = _starts(position_ids).reshape(-1).nonzero().squeeze(1)
    ends = torch.cat([first[1:], first.new_tensor([batch * length])])
    return first, ends - first


@dataclass(frozen=True)
class Segments:
    """Where the samples of a packed batch lie, worked out on the host before the batch goes to the device (the
    engine passes them to every layer as `studio_segments`). Found on a GPU instead, each layer's `nonzero` and
    `.tolist()` would stall the host until the GPU caught up, twice per layer and again in the recomputation."""
    cumulative: torch.Tensor  # (samples + 1,) int32: where each sample starts in the flattened tokens, then their count
    longest: int
    groups: tuple[torch.Tensor, ...]  # per power-of-two width: (samples, width) token indices, padding -> a zero row
    slots: torch.Tensor  # (tokens,) each token's place in the groups' outputs laid end to end

    @classmethod
    def of(cls, position_ids: torch.Tensor) -> "Segments":
        """From (batch, length) position_ids on the host."""
        starts, lengths = _segments(position_ids)
        tokens = position_ids.numel()
        width = 2 ** torch.ceil(torch.log2(lengths.float())).long()
        groups, slots, filled = [], torch.empty(tokens, dtype=torch.long), 0
        for size in width.unique().tolist():
            pick = width == size
            offsets = torch.arange(size)
            index = starts[pick, None] + offsets  # (samples, size) token indices
            valid = offsets < lengths[pick, None]
            slots[index[valid]] = filled + torch.arange(index.numel()).view_as(index)[valid]
            groups.append(torch.where(valid, index, tokens))  # padding slots read the zero row after the tokens
            filled += index.numel()
        cumulative = torch.cat([starts, starts.new_tensor([tokens])]).to(torch.int32)
        return cls(cumulative, int(lengths.max()), tuple(groups), slots)

    def to(self, device: torch.device) -> "Segments":
        move = partial(to_device, device=device)
        return Segments(move(self.cumulative), self.longest, tuple(map(move, self.groups)), move(self.slots))


def _segments_of(position_ids: torch.Tensor, given: Segments | None) -> Segments:
    """The engine's segments, or (a caller that passed none) those of `position_ids`, through one copy to the host."""
    return given or Segments.of(position_ids.cpu()).to(position_ids.device)


def _block_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, length, length): True where a token may attend (same sample, not later) — transformers' mask."""
    sample = _starts(position_ids).cumsum(-1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((sample[:, :, None] == sample[:, None, :]) & causal)[:, None]


def _whole_rows(query: torch.Tensor, key: torch.Tensor, position_ids: torch.Tensor | None, kwargs: dict) -> bool:
    """True for self-attention over whole rows (training, prefill); False for decoding against a KV cache."""
    for name in ("sliding_window", "softcap", "s_aux"):  # `choose` keeps such models on the dense mask
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"Packed attention does not support {name}; set packing: false for this model.")
    return position_ids is not None and query.shape[2] == key.shape[2]


def grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None,
                      studio_segments: Segments | None = None, **kwargs):
    """transformers attention signature; query (B, H, L, D), key/value (B, Hkv, L, D) → output (B, L, H, D)."""
    batch, heads, length, dim = query.shape
    whole = _whole_rows(query, key, position_ids, kwargs)
    if not whole or length <= DENSE_UP_TO:
        mask = _block_mask(position_ids.expand(batch, -1)) if whole else attention_mask
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    segments = _segments_of(position_ids.expand(batch, -1), studio_segments)
    # Token-major, plus one zero row that padded slots of a group read from.
    q, k, v = (F.pad(t.transpose(1, 2).reshape(batch * length, t.shape[1], dim), (0, 0, 0, 0, 0, 1))
               for t in (query, key, value))
    results = []
    for index in segments.groups:
        group = [t[index].transpose(1, 2) for t in (q, k, v)]  # (samples, heads, size, dim)
        result = F.scaled_dot_product_attention(*group, dropout_p=dropout, scale=scaling, is_causal=True,
                                                enable_gqa=key.shape[1] != heads)
        results.append(result.transpose(1, 2).reshape(-1, heads, dim))
    out = torch.cat(results)[segments.slots].to(query.dtype)  # each token's row, padding slots left behind
    return out.view(batch, length, heads, dim), None


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None,
                     studio_segments: Segments | None = None, **kwargs):
    """The same with PyTorch's flash varlen kernel (CUDA sm80+, fp16/bf16, no dropout)."""
    from torch.nn.attention.varlen import varlen_attn

    whole = _whole_rows(query, key, position_ids, kwargs)
    if not whole or dropout or query.dtype not in (torch.float16, torch.bfloat16):
        return grouped_attention(module, query, key, value, attention_mask, dropout, scaling, position_ids,
                                 studio_segments, **kwargs)
    batch, heads, length, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    segments = _segments_of(position_ids.expand(batch, -1), studio_segments)
    out = varlen_attn(q, k, v, segments.cumulative, segments.cumulative, segments.longest, segments.longest,
                      scale=scaling, window_size=(-1, 0), enable_gqa=key.shape[1] != heads)
    return out.view(batch, length, heads, dim), None


AttentionInterface.register(GROUPED, grouped_attention)
AttentionInterface.register(VARLEN, varlen_attention)
