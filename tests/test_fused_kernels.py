"""liger's fused kernels are for CUDA: on the CPU the LLM keeps transformers' modules and outputs exactly."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from studio.fused_kernels import apply_fused_kernels


def test_cpu_keeps_transformers_modules(demo):
    model = AutoModelForCausalLM.from_pretrained(demo.llama)
    ids = torch.tensor([[1, 5, 9, 3]])
    before = model(ids).logits
    forwards = {name: type(m).forward for name, m in model.named_modules()}
    assert apply_fused_kernels(model, torch.device("cpu")) is None
    assert {name: type(m).forward for name, m in model.named_modules()} == forwards
    assert not any("forward" in vars(m) for m in model.modules())  # no instance-bound replacement either
    assert torch.equal(model(ids).logits, before)


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None, reason="triton is installed: liger would run")
def test_cuda_without_triton_says_so_and_keeps_the_pytorch_path(demo):
    """`make` installs liger-kernel without its dependencies; where no CUDA torch build brought triton, importing it
    fails and the run goes on with transformers' modules (this machine: liger installed, no triton)."""
    model = AutoModelForCausalLM.from_pretrained(demo.llama)
    message = apply_fused_kernels(model, torch.device("cuda"))  # returns before touching any CUDA tensor
    assert "liger-kernel is not usable here" in message and "requirements-nodeps.txt" in message
    assert not any("forward" in vars(m) for m in model.modules())
