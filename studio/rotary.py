"""Rotary embeddings without explicit fp32 copies (issue 24).

diffusers' `apply_rotary_emb` (Flux.1, Chroma, FLUX.2) computes `(x.float() * cos + x_rotated.float() *
sin).to(x.dtype)` with fp32 cos / sin: two `.float()` copies of a 16-bit tensor for every query and key, forward (228
copy kernels per Flux.1 forward). A 16-bit tensor times an fp32 one already computes in fp32 (type promotion: converted
as it is read, in the same kernel), so `(x * cos + x_rotated * sin).to(x.dtype)` gives the same numbers, forward and
backward, bit for bit (tests/test_rotary.py), without the copies.

`lean_rotary_embedding()` points the diffusers modules that call `apply_rotary_emb` at `rotary_embedding`, which
takes that path for the layout those models use (real fp32 cos / sin, pairs interleaved) and hands any other call
to diffusers' own function. It is idempotent and leaves a module whose function is not diffusers' alone.
"""

from __future__ import annotations

import sys

import torch


def _original():
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb


def rotary_embedding(x: torch.Tensor, freqs_cis, use_real: bool = True, use_real_unbind_dim: int = -1,
                     sequence_dim: int = 2) -> torch.Tensor:
    """diffusers' `apply_rotary_emb`, without `.float()` copies for real fp32 cos / sin with interleaved pairs."""
    cos, sin = freqs_cis if use_real else (None, None)
    if use_real_unbind_dim != -1 or sequence_dim not in (1, 2) or cos is None or cos.dtype != torch.float32:
        return _original()(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)  # the promotion is fp32's
    at = (None, None, slice(None), slice(None)) if sequence_dim == 2 else (None, slice(None), None, slice(None))
    cos, sin = cos[at].to(x.device), sin[at].to(x.device)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x * cos + x_rotated * sin).to(x.dtype)


def lean_rotary_embedding() -> int:
    """Point the loaded diffusers modules that call diffusers' `apply_rotary_emb` at `rotary_embedding`; returns how
    many modules now do."""
    original = _original()
    modules = [module for name, module in list(sys.modules.items())
               if name.startswith("diffusers.models.transformers.")
               and getattr(module, "apply_rotary_emb", None) in (original, rotary_embedding)]
    for module in modules:
        module.apply_rotary_emb = rotary_embedding
    return len(modules)
