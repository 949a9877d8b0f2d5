"""The fused LoRA Linear path (studio/fused_lora.py) computes what peft's forward computes: in fp32 at the default
alpha = rank the same loss bit for bit and the same gradients to fp32 rounding (a layer's input gradient is base +
LoRA before autograd adds the other readers' gradients: a reassociated sum), within bf16 rounding under bf16 autocast;
it leaves peft's forward to everything else."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from studio.fused_lora import FusedLoraLinear, fuse_lora_linears

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
LORA = {"r": 4, "lora_alpha": 4}


def _unet(demo, **lora):
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(demo.sd15 / "unet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(target_modules=ATTENTION, init_lora_weights="gaussian", **{**LORA, **lora}))
    cfg = unet.config
    inputs = (torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size), torch.tensor([10, 500]),
              torch.randn(2, 7, cfg.cross_attention_dim))
    return unet, lambda model: model(*inputs).sample.float().square().mean()


def _llama(demo, **lora):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo.llama)
    model = get_peft_model(model, LoraConfig(target_modules="all-linear", **{**LORA, **lora}))
    ids = torch.randint(model.config.vocab_size, (2, 24))
    return model, lambda m: m(input_ids=ids, labels=ids).loss


def _loss_and_grads(model, loss_fn, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(model)
    loss.backward()
    return loss.detach().float(), {name: p.grad.float() for name, p in model.named_parameters() if p.requires_grad}


def _backward_nodes(loss: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind `loss`."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [parent for parent, _ in node.next_functions]
    return {node.name() for node in seen}


def _peft_and_fused(build, demo, dtype, **lora):
    """peft's model (B drawn at random, so every LoRA weight has a gradient) and a fused copy, in `dtype`."""
    model, loss_fn = build(demo, **lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.to(dtype)
    fused = copy.deepcopy(model)
    assert fuse_lora_linears([fused]) > 0
    return model, fused, loss_fn


@pytest.mark.parametrize("build", [_unet, _llama])
def test_fused_path_is_exact_in_fp32(demo, build):
    model, fused, loss_fn = _peft_and_fused(build, demo, torch.float32)
    loss, grads = _loss_and_grads(model, loss_fn, autocast=False)
    fused_loss, fused_grads = _loss_and_grads(fused, loss_fn, autocast=False)
    assert torch.equal(loss, fused_loss)
    assert "_LoraLinearBackward" in _backward_nodes(loss_fn(fused))  # the base layer inside the one node
    assert grads.keys() == fused_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item(), msg=name)
    assert get_peft_model_state_dict(fused).keys() == get_peft_model_state_dict(model).keys()


@pytest.mark.parametrize("build", [_unet, _llama])
def test_fused_path_is_within_bf16_noise_under_autocast(demo, build):
    """Against the same weights in fp32 without autocast, the fused path errs as much as peft's bf16 path does
    (the rounding is in other places: one rounding of base + LoRA instead of three), not more."""
    # alpha != rank: the scale is addmm's alpha forward, one multiply of the output gradient backward
    model, fused, loss_fn = _peft_and_fused(build, demo, torch.bfloat16, lora_alpha=8)
    exact, exact_grads = _loss_and_grads(copy.deepcopy(model).float(), loss_fn, autocast=False)
    loss, grads = _loss_and_grads(model, loss_fn, autocast=True)
    fused_loss, fused_grads = _loss_and_grads(fused, loss_fn, autocast=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "_LoraLinearBackward" in _backward_nodes(loss_fn(fused))
    assert abs(fused_loss - exact) <= 2 * abs(loss - exact) + 1e-3 * exact

    def error(found):
        return sum((found[k] - exact_grads[k]).norm() for k in exact_grads) / sum(map(torch.norm, exact_grads.values()))
    assert error(grads) < 0.05 and error(fused_grads) <= 2 * error(grads)


def test_other_layers_and_states_keep_peft_forward(demo):
    model, fused, loss_fn = _peft_and_fused(_llama, demo, torch.float32, use_dora=True, lora_dropout=0.1)
    assert any(isinstance(m, FusedLoraLinear) for m in fused.modules())
    model.eval(), fused.eval()
    with torch.no_grad():
        assert torch.equal(loss_fn(model), loss_fn(fused))  # DoRA: peft's own forward
    model, fused, loss_fn = _peft_and_fused(_llama, demo, torch.float32, lora_dropout=0.1)
    model.train(), fused.train()
    torch.manual_seed(1)
    dropped = loss_fn(model)
    torch.manual_seed(1)
    fused_dropped = loss_fn(fused)
    assert torch.equal(dropped, fused_dropped)  # dropout: peft's module, the same draws
    assert {"_LoraBranchBackward"} <= _backward_nodes(fused_dropped) and "_LoraLinearBackward" not in \
        _backward_nodes(fused_dropped)  # the base layer's own forward, the LoRA path added to its output
    assert not torch.equal(dropped, loss_fn(fused))  # (it drops)
    with torch.no_grad(), model.disable_adapter(), fused.disable_adapter():
        assert torch.equal(loss_fn(model), loss_fn(fused))
