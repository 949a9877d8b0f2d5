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


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed")
def test_cuda_without_liger_says_how_to_install(demo):
    model = AutoModelForCausalLM.from_pretrained(demo.llama)
    message = apply_fused_kernels(model, torch.device("cuda"))  # returns before touching any CUDA tensor
    assert "liger-kernel is not installed" in message and "requirements-extras.txt" in message
