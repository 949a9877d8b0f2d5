"""The trained models' GroupNorm / LayerNorm run in the compute dtype under autocast (studio/compute_dtype_norms.py):
the numerics of autocast's fp32 norms within bf16 rounding, the same weights and state dict, applied by the trainer,
and under CUDA autocast's rules (emulated on the CPU: studio/plan/autocast_trace.py, which the memory plan traces
with) no casts around the norms."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.overrides import TorchFunctionMode

from bench.ops_per_update import DispatchCounter
from studio import loop
from studio.compute_dtype_norms import GroupNormInComputeDtype, LayerNormInComputeDtype, norms_in_compute_dtype
from studio.config import config_from_dict
from studio.events import EventSink
from studio.plan.autocast_trace import AutocastRules


def _unet(demo) -> tuple[UNet2DConditionModel, tuple]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(demo.sd15 / "unet")
    cfg = unet.config
    inputs = (torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size), torch.tensor([10, 500]),
              torch.randn(2, 7, cfg.cross_attention_dim))
    return unet, inputs


def _loss(unet, inputs, rules: bool = False) -> torch.Tensor:
    """The loss under bf16 autocast (CPU's), or under CUDA autocast's rules as the plan emulates them."""
    with AutocastRules(torch.bfloat16) if rules else torch.autocast("cpu", dtype=torch.bfloat16):
        return unet(*(x.bfloat16() if x.is_floating_point() else x for x in inputs)).sample.float().square().mean()


def test_norms_in_bf16_are_within_bf16_rounding_of_fp32_norms(demo):
    unet, inputs = _unet(demo)
    exact = unet(*inputs).sample.float().square().mean()  # fp32 throughout
    unet.to(torch.bfloat16)
    lean = copy.deepcopy(unet)
    assert norms_in_compute_dtype([lean], torch.bfloat16) == sum(
        isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) for m in unet.modules()) > 0
    assert {type(m) for m in lean.modules()} >= {GroupNormInComputeDtype, LayerNormInComputeDtype}
    for (name, ours), theirs in zip(lean.state_dict().items(), unet.state_dict().values()):
        assert torch.equal(ours, theirs), name
    autocast, ours = _loss(unet, inputs), _loss(lean, inputs)
    assert abs(ours - exact) <= 2 * abs(autocast - exact) + 1e-2 * exact


def test_only_norms_with_weights_in_the_compute_dtype_change(demo):
    unet, _ = _unet(demo)
    assert norms_in_compute_dtype([unet], torch.bfloat16) == 0  # fp32 weights: autocast's rule stays
    unet.conv_norm_out.to(torch.bfloat16)
    assert norms_in_compute_dtype([unet], torch.bfloat16) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert unet.conv_norm_out(torch.randn(1, unet.config.block_out_channels[0], 4, 4)).dtype == torch.bfloat16


def test_under_cuda_autocast_rules_the_norms_cast_nothing(demo):
    unet, inputs = _unet(demo)
    unet.to(torch.bfloat16).requires_grad_(False)
    unet.conv_in.weight.requires_grad_(True)  # so that the backward runs through every layer
    counts = []
    for fp32_norms in (True, False):
        with DispatchCounter() as casts:
            with AutocastRules(torch.bfloat16, fp32_norms):
                loss = unet(*(x.bfloat16() if x.is_floating_point() else x for x in inputs)).sample
            loss.float().square().mean().backward()
        counts.append(casts.count)
    norms = sum(isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) for m in unet.modules())
    # autocast's rule: each norm casts its input up and its output down once per reader, forward and backward
    assert counts[0] - counts[1] >= 4 * norms, counts


def test_the_trainer_runs_the_norms_in_the_compute_dtype(demo, tmp_path, monkeypatch):
    swapped = []
    monkeypatch.setattr(loop, "norms_in_compute_dtype",
                        lambda modules, dtype: swapped.append(norms_in_compute_dtype(modules, dtype)) or swapped[-1])
    cfg = {"base_model": str(demo.sd15), "train_data_dir": str(demo.images), "resolution": 64, "device": "cpu",
           "enable_bucket": False, "save_steps": 0, "sample_every_steps": 0, "sample_prompts": [], "max_train_steps": 1}
    loop.train(config_from_dict({**cfg, "output_dir": str(tmp_path / "bf16"), "mixed_precision": "bf16"}),
               EventSink([]))
    loop.train(config_from_dict({**cfg, "output_dir": str(tmp_path / "fp32"), "mixed_precision": "no"}),
               EventSink([]))
    assert len(swapped) == 1 and swapped[0] > 0  # bf16: every norm of the UNet; fp32: no autocast, no swap


@pytest.mark.parametrize("rules", [False, True])
def test_swapped_norms_keep_gradients_flowing(demo, rules):
    unet, inputs = _unet(demo)
    unet.to(torch.bfloat16)
    norms_in_compute_dtype([unet], torch.bfloat16)
    _loss(unet, inputs, rules).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in unet.modules()
               if isinstance(m, GroupNormInComputeDtype) for p in m.parameters())


def _rms_pair():
    from diffusers.models.normalization import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    lean = copy.deepcopy(norm)
    assert norms_in_compute_dtype([lean], torch.bfloat16) == 1
    return norm, lean


class _RmsNormCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.nn.functional.rms_norm
        return func(*args, **(kwargs or {}))


def test_diffusers_rms_norm_runs_as_one_fused_call_within_bf16_rounding():
    norm, lean = _rms_pair()
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16) * 3
    exact = norm.float()(x.float())
    norm.bfloat16()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), _RmsNormCalls() as calls:
            ours, theirs = lean(x), norm(x)
        assert calls.calls == 1 and ours.dtype == theirs.dtype == torch.bfloat16  # on CUDA: `_fused_rms_norm`
        assert (ours.float() - exact).abs().max() <= 2 * (theirs.float() - exact).abs().max() + 1e-6


def test_the_plan_keeps_what_the_fused_rms_norm_keeps():
    """The planner's trace of a swapped RMSNorm (meta device) holds the input and one fp32 value per row, as CUDA's
    fused kernel does; diffusers' own forward keeps an fp32 copy of the input and more."""
    from studio.plan.trace import trace_saved

    norm, lean = _rms_pair()

    def saved(module) -> int:
        layer = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), module).to("meta", torch.bfloat16)
        layer[0].weight.requires_grad_(False)
        x = torch.empty(4, 16, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
        return trace_saved(layer, lambda: layer(x).float().sum(), lambda model, func: None).outside

    rows = 4 * 16
    assert saved(lean) == rows * 64 * 2 + rows * 4  # the norm's input and 1/RMS (the frozen linear: its weight)
    assert saved(norm) > saved(lean) + rows * 64 * 4  # at least an fp32 copy of the input more
