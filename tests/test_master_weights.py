"""bf16 runs train the LoRA weights in bf16 with fp32 master copies (studio/master_weights.py): no cast per call,
the numerics of fp32 LoRA weights under autocast, bit-exact resume, fp32 adapters of the same layout."""

import threading

import pytest
import torch
from safetensors.torch import load_file

from bench.ops_per_update import count
from studio import fused_lora, loop
from studio.config import config_from_dict
from studio.events import EventSink
from studio.loop import train
from studio.master_weights import MasterWeights, SameWeights

BF16 = {"mixed_precision": "bf16", "device": "cpu", "resolution": 64, "enable_bucket": False, "batch_size": 2,
        "gradient_accumulation_steps": 2, "save_steps": 0, "sample_every_steps": 0, "sample_prompts": [],
        "lora_rank": 4, "lora_dropout": 0.1, "max_train_steps": 8}
# The tiny demo UNet, bf16, batch 8: 613 aten::copy_ per update with fp32 LoRA weights (casts in every LoRA call);
# 242 with master weights (a cat of the LoRA gradients, LoRA's scalar casts); 155 with the fused LoRA path
# (studio/fused_lora.py), most of them the base model's (its 0-dim scalar casts, bias copies in CPU addmm); of those
# 34 are dispatched as ops of their own, the copies a GPU runs as kernels (the rest happen inside CPU kernels).
COPIES_BOUND = 165
DISPATCHED_COPIES_BOUND = 40


def _run(demo, out, stop=None, **extra):
    losses = []
    cfg = config_from_dict({"base_model": str(demo.sd15), "train_data_dir": str(demo.images),
                            "output_dir": str(out), **BF16, **extra})
    result = train(cfg, EventSink([lambda e: e.kind == "progress" and losses.append(e.data["loss"]),
                                   lambda e: stop and e.kind == "progress" and e.step == 3 and stop.set()]), stop)
    return result, losses


def test_bf16_weights_train_like_fp32_weights_under_autocast(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(fused_lora, "fuse_lora_linears", lambda modules: 0)  # peft's forward in both (see below)
    result, losses = _run(demo, tmp_path / "master", lora_dropout=0.0)
    monkeypatch.setattr(loop, "trainable_weights", lambda groups, autocast, sharded: SameWeights(groups))
    reference, reference_losses = _run(demo, tmp_path / "fp32-lora", lora_dropout=0.0)
    # The same bf16 products (autocast rounds fp32 weights as the master copy is rounded), the same fp32
    # accumulation and update: only the order of fp32 sums in the gradient norm differs. (With LoRA dropout the
    # dropout's scale is applied in bf16 rather than fp32: within bf16 noise, ~0.2 % on these losses.)
    assert losses == pytest.approx(reference_losses, rel=1e-6)
    ours, theirs = load_file(str(result.files[0])), load_file(str(reference.files[0]))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype == torch.float32
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-7)


def test_fused_lora_trains_like_peft_within_bf16_noise(demo, tmp_path, monkeypatch):
    fused, losses = _run(demo, tmp_path / "fused")
    monkeypatch.setattr(fused_lora, "fuse_lora_linears", lambda modules: 0)
    reference, reference_losses = _run(demo, tmp_path / "peft")
    # One bf16 rounding of base + LoRA output instead of three: the same curve within bf16 noise, not bit for bit.
    assert losses == pytest.approx(reference_losses, rel=5e-3) and losses != reference_losses
    ours, theirs = load_file(str(fused.files[0])), load_file(str(reference.files[0]))
    assert ours.keys() == theirs.keys()
    for key in ours:  # after 8 updates up to ~6 % of a tensor's largest entry (lora_up starts at zero)
        assert (ours[key] - theirs[key]).abs().max() <= 0.1 * theirs[key].abs().max(), key


def test_bf16_resume_is_bit_exact(demo, tmp_path):
    full, _ = _run(demo, tmp_path / "full", save_steps=3)
    stopped, _ = _run(demo, tmp_path / "part", stop=threading.Event(), save_steps=3)
    assert stopped.stopped and stopped.step == 3
    resumed, _ = _run(demo, tmp_path / "part", save_steps=3, resume_from="latest")
    a, b = load_file(str(full.files[0])), load_file(str(resumed.files[0]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    checkpoint = load_file(str(tmp_path / "part" / "checkpoints" / "step-000003" / "adapter.safetensors"))
    assert {t.dtype for t in checkpoint.values()} == {torch.float32}  # the master, not its bf16 rounding


def test_optimizer_state_of_one_entry_per_weight_loads_flat():
    weights = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    old = torch.optim.AdamW(weights, lr=0.1)
    for w in weights:
        w.grad = torch.randn_like(w)
    old.step()
    master = MasterWeights([{"params": weights, "lr": 0.1}], torch.bfloat16)
    new = torch.optim.AdamW(master.groups, lr=0.1)
    master.load_optimizer_state(new, old.state_dict())
    state = new.state[master.groups[0]["params"][0]]
    assert torch.equal(state["exp_avg"], torch.cat([old.state[w]["exp_avg"].reshape(-1) for w in weights]))
    assert int(state["step"]) == 1


def test_gradients_land_in_the_flat_buffer_even_when_a_grad_was_reset():
    weights = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    master = MasterWeights([{"params": weights, "lr": 0.1}], torch.bfloat16)
    (2 * weights[0].sum() + weights[1].sum()).backward()  # autograd adds into each .grad: a slice of the buffer
    master.collect()
    weights[0].grad = None  # e.g. a module's zero_grad(): autograd then hands it a new tensor
    (weights[0].sum() + weights[1].sum()).backward()
    master.collect()
    assert torch.equal(master.grad, torch.cat([torch.full((12,), 3.0), torch.full((5,), 2.0)]))
    assert weights[0].grad.data_ptr() == master.compute_grad.data_ptr() and not weights[0].grad.any()


def test_bf16_update_needs_few_copies(demo, tmp_path):
    counted = count(demo.sd15, demo.images, {**BF16, "batch_size": 8, "gradient_accumulation_steps": 1},
                    tmp_path / "run", profiled=(3, 4), timed=2)
    assert counted["copies"] <= COPIES_BOUND and counted["kernel_copies"] <= DISPATCHED_COPIES_BOUND
