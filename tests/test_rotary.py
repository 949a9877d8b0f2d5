"""The RoPE of Flux-style transformers without `.float()` copies (studio/rotary.py): bit for bit diffusers' numbers,
forward and backward, with two casts fewer per call; the trainer's Flux model runs it."""

import pytest
import torch
from diffusers.models import embeddings
from diffusers.models.transformers import transformer_flux

from bench.ops_per_update import DispatchCounter
from studio.rotary import lean_rotary_embedding, rotary_embedding


def _inputs(sequence_dim: int):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 16) if sequence_dim == 2 else torch.randn(2, 10, 3, 16)
    cos, sin = embeddings.get_1d_rotary_pos_embed(16, 10, use_real=True, repeat_interleave_real=True)
    return x.bfloat16().requires_grad_(True), (cos.float(), sin.float())


def _casts_value_and_grad(function, x, freqs, sequence_dim: int):
    x.grad = None
    with DispatchCounter() as casts:
        out = function(x, freqs, sequence_dim=sequence_dim)
        out.float().square().sum().backward()
    return casts.count, out.detach(), x.grad.clone()


@pytest.mark.parametrize("sequence_dim", [1, 2])
def test_same_numbers_bit_for_bit_with_two_casts_fewer(sequence_dim):
    x, freqs = _inputs(sequence_dim)
    theirs = _casts_value_and_grad(embeddings.apply_rotary_emb, x, freqs, sequence_dim)
    ours = _casts_value_and_grad(rotary_embedding, x, freqs, sequence_dim)
    assert torch.equal(ours[1], theirs[1]) and torch.equal(ours[2], theirs[2])
    assert ours[1].dtype == torch.bfloat16
    assert theirs[0] - ours[0] == 2  # the two `.float()` copies (backward casts the fp32 gradients down either way)


def test_other_layouts_go_to_diffusers():
    x, (cos, sin) = _inputs(2)
    for freqs, unbind in (((cos.bfloat16(), sin.bfloat16()), -1), ((cos, sin), -2)):
        ours = rotary_embedding(x, freqs, use_real_unbind_dim=unbind)
        assert torch.equal(ours, embeddings.apply_rotary_emb(x, freqs, use_real_unbind_dim=unbind))


def test_the_flux_transformer_runs_it(monkeypatch):
    monkeypatch.setattr(transformer_flux, "apply_rotary_emb", embeddings.apply_rotary_emb)
    assert lean_rotary_embedding() >= 1 and transformer_flux.apply_rotary_emb is rotary_embedding
    assert lean_rotary_embedding() >= 1  # idempotent
