"""Block swap (studio/block_swap.py) on a tiny Flux.1 transformer and the demo SD1.5 UNet, on the CPU: the same losses,
LoRA gradients and adapter as without it, with and without gradient checkpointing, and every swapped block's
weights on the device whenever its forward or backward runs."""

import copy
import math

import pytest
import torch
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from studio.block_swap import (BACKWARD, FORWARD, IN_FLIGHT, BlockSwap, frozen_tensors, in_flight_bytes,
                               swapped_bytes, transfer_seconds)
from studio.demo.diffusion import PRETRAINED_SD15, TEXT_HIDDEN
from studio.demo.flux import T5_WIDTH, tiny_flux_transformer
from studio.errors import StudioError
from studio.families.flux1 import FluxRecipe
from studio.families.sd15 import UNetRecipe

CPU = torch.device("cpu")
STEPS = 3


class PoisonedSwap(BlockSwap):
    """A swapped block's weights read NaN (packed integer weights: 0) whenever they are not loaded, so any use of a
    block that was not moved in first (forward, backward or recompute) changes the loss or the gradients."""

    def attach(self):
        super().attach()
        for index in self.swapped:
            self._release(index)
        return self

    def _release(self, index):
        super()._release(index)
        for tensor in self._tensors[index]:
            tensor.data = torch.full_like(tensor, math.nan if tensor.is_floating_point() else 0)


def flux_model():
    torch.manual_seed(0)
    model = tiny_flux_transformer(layers=2, single_layers=3)
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(2, 16, 64, generator=g), "timestep": torch.tensor([0.3, 0.7]),
              "guidance": torch.ones(2), "pooled_projections": torch.randn(2, 32, generator=g),
              "encoder_hidden_states": torch.randn(2, 6, T5_WIDTH, generator=g), "txt_ids": torch.zeros(6, 3),
              "img_ids": torch.zeros(16, 3), "return_dict": False}
    return model, inputs, FluxRecipe()


def sd15_model():
    model = UNet2DConditionModel.from_pretrained(PRETRAINED_SD15 / "unet")
    g = torch.Generator().manual_seed(1)
    inputs = {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(2, 7, TEXT_HIDDEN, generator=g), "return_dict": False}
    return model, inputs, UNetRecipe()


def with_lora(model, checkpointing: bool):
    model.requires_grad_(False)
    # gaussian lora_B: both LoRA matrices get gradients from the first step
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def train(model, inputs):
    """A few AdamW steps on a fixed target: (losses, LoRA gradients of each step, final LoRA weights)."""
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    losses, grads = [], []
    for step in range(STEPS):
        out = model(**inputs)[0]
        loss = ((out - 0.1 * step) ** 2).mean()
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in lora.items()})
        optimizer.step()
        optimizer.zero_grad()
    return losses, grads, {n: p.detach().clone() for n, p in lora.items()}


@pytest.mark.parametrize("build", [flux_model, sd15_model], ids=["flux1", "sd15"])
@pytest.mark.parametrize("checkpointing,early_stop", [(False, True), (True, True), (True, False)],
                         ids=["plain", "checkpointing", "checkpointing-full-recompute"])
def test_same_losses_gradients_and_adapter(build, checkpointing, early_stop):
    """early_stop=False: the recompute runs each block's forward to the end (its forward hooks run in the backward)."""
    model, inputs, recipe = build()
    plain = with_lora(model, checkpointing)
    swapped = copy.deepcopy(plain)
    blocks = recipe.swap_blocks(swapped)
    count = len(blocks) - 1
    moves = []
    swap = PoisonedSwap(blocks, count, CPU, on_move=lambda why, index, size: moves.append((why, index, size))).attach()

    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        expected, actual = train(plain, inputs), train(swapped, inputs)

    assert all(math.isfinite(x) for x in actual[0])
    assert max(abs(a - b) for a, b in zip(expected[0], actual[0])) <= 1e-6, (expected[0], actual[0])
    for want, got in zip(expected[1], actual[1]):
        assert want.keys() == got.keys() and max((want[n] - got[n]).abs().max().item() for n in want) <= 1e-6
    assert max((expected[2][n] - actual[2][n]).abs().max().item() for n in expected[2]) <= 1e-6
    # Each swapped block that carries gradients came in once for its forward and once for its backward per step:
    # forwards in execution order, backwards in reverse; the bytes are those the speed estimate counts.
    first_lora = next(i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters()))
    with_grad = [i for i in swap.swapped if i >= first_lora]  # gradients flow through it
    assert with_grad
    forward_order = [i for why, i, _ in moves if why == FORWARD]
    backward_order = [i for why, i, _ in moves if why == BACKWARD]
    assert forward_order == list(swap.swapped) * STEPS
    assert backward_order == sorted(with_grad, reverse=True) * STEPS
    if with_grad == list(swap.swapped):
        assert swap.bytes_moved == STEPS * transfer_seconds(blocks, count, 1.0) * 1e9
    assert all(t.isnan().all() for i in swap.swapped for t in swap._tensors[i])  # all released after the step


def bf16_lora_grads(model, inputs) -> dict[str, torch.Tensor]:
    """The LoRA gradients of one bf16-autocast forward and backward of the tiny Flux.1 transformer."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**{k: v.to(torch.bfloat16) if k in ("hidden_states", "pooled_projections",
                                                            "encoder_hidden_states") else v
                       for k, v in inputs.items()})[0]
    out.float().square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_fp8_storage_streams_fp8_and_trains_the_same():
    """fp8 storage (diffusers' layerwise casting, as fp8_base sets it) under bf16 autocast with checkpointing: the
    swapped blocks cross in fp8 and the gradients are those without swap."""
    results = []
    for count in (0, 3):
        model, inputs, recipe = flux_model()
        model = model.to(torch.bfloat16).requires_grad_(False)
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        model = with_lora(model, checkpointing=True)
        blocks = recipe.swap_blocks(model)
        moved = []
        BlockSwap(blocks, count, CPU, on_move=lambda why, index, size: moved.append(size)).attach()
        results.append(bf16_lora_grads(model, inputs))
        adapted = [m.base_layer.weight for b in blocks[len(blocks) - count:] for m in b.modules()
                   if hasattr(m, "base_layer")]
        assert all(w.dtype == torch.float8_e4m3fn for w in adapted) and (adapted or not count)
        assert sum(moved) == 2 * swapped_bytes(blocks, count)
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_nf4_weights_stream_with_their_quantization_data():
    """load_in_4bit's NF4 layers (bitsandbytes' CPU backend here): weights, absmax and offsets move; same gradients."""
    from studio.models.nf4 import quantize_linears_nf4

    results = []
    for count in (0, 3):
        model, inputs, recipe = flux_model()
        model = model.to(torch.bfloat16).requires_grad_(False)
        quantize_linears_nf4(model, CPU, compute_dtype=torch.bfloat16)
        model = with_lora(model, checkpointing=False)
        blocks = recipe.swap_blocks(model)
        swap = PoisonedSwap(blocks, count, CPU).attach()
        if count:
            absmax = blocks[-1].attn.to_q.base_layer.weight.quant_state.absmax
            assert any(t is absmax for t in swap._tensors[len(blocks) - 1])  # poisoned between uses too
        results.append(bf16_lora_grads(model, inputs))
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_backward_keeps_at_most_two_blocks_loaded():
    model, inputs, recipe = flux_model()
    model = with_lora(model, checkpointing=True)
    blocks = recipe.swap_blocks(model)
    swap = BlockSwap(blocks, len(blocks), CPU).attach()
    peak = []
    for block in blocks:  # after the swap's own hooks: what is loaded while a block computes
        block.register_forward_pre_hook(lambda *_: peak.append(sum(map(swap.is_loaded, swap.swapped))))
    model(**inputs)[0].mean().backward()
    assert peak and max(peak) <= IN_FLIGHT
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lora_stays_on_the_device_and_detach_leaves_blocks_home():
    model, inputs, recipe = flux_model()
    model = with_lora(model, checkpointing=False)
    blocks = recipe.swap_blocks(model)
    lora = [p for p in blocks[-1].parameters() if p.requires_grad]
    before = [p.data_ptr() for p in lora]
    swap = BlockSwap(blocks, 2, CPU).attach()
    model(**inputs)[0].mean().backward()
    assert [p.data_ptr() for p in lora] == before  # the optimizer's tensors are never replaced
    swap.detach()
    weight = frozen_tensors(blocks[-1])[0]
    host = weight.data_ptr()
    model(**inputs)
    assert weight.data_ptr() == host  # no hooks: the block computes where it is


def test_sizes_for_the_plan():
    model, _, recipe = flux_model()
    model.requires_grad_(False)
    blocks = recipe.swap_blocks(model)
    sizes = [sum(t.numel() * t.element_size() for t in frozen_tensors(b)) for b in blocks]
    assert swapped_bytes(blocks, 0) == 0 and swapped_bytes(blocks, 3) == sum(sizes[-3:])
    assert in_flight_bytes(blocks, 3) == sum(sorted(sizes[-3:])[-2:])
    assert transfer_seconds(blocks, 3, 10.0) == pytest.approx(2 * sum(sizes[-3:]) / 10e9)


def test_too_many_blocks_is_a_clear_error(demo, tmp_path):
    from studio.config import config_from_dict
    from studio.loop import train as train_run

    model, _, recipe = sd15_model()
    blocks = recipe.swap_blocks(model)
    with pytest.raises(StudioError, match=f"between 0 and {len(blocks)}"):
        BlockSwap(blocks, len(blocks) + 1, CPU)
    cfg = config_from_dict({"preset": "demo-image", "base_model": str(demo.sd15), "train_data_dir": str(demo.images),
                            "output_dir": str(tmp_path / "run"), "max_train_steps": 1, "blocks_to_swap": 99})
    with pytest.raises(StudioError, match=f"blocks_to_swap is 99, but this denoiser has {len(blocks)} blocks"):
        train_run(cfg)


def test_time_estimate_adds_the_copying_to_a_run_without_swap(tmp_path):
    import json

    from studio.config import config_from_dict
    from studio.plan.speed import PCIE_GBPS, estimate_text, run_signature

    common = {"base_model": "m", "train_data_dir": "d", "output_dir": "o", "batch_size": 2, "max_train_steps": 100}
    plain = config_from_dict(common, check_paths=False)
    swapping = config_from_dict({**common, "blocks_to_swap": 20}, check_paths=False)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    events = [{"kind": "plan", "data": {"signature": run_signature(plain, "flux1", "GPU"), "effective_batch": 2}},
              {"kind": "progress", "data": {"it_per_s": 0.5}}]  # 1 s per sample
    (earlier / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n", encoding="utf-8")
    swap_bytes = int(6e9)  # 2 passes × 6 GB at 12 GB/s = 1 s per step of 2 samples: +0.5 s per sample
    signature = run_signature(swapping, "flux1", "GPU")
    text = estimate_text(swapping, tmp_path, signature, swap_bytes)
    assert PCIE_GBPS == 12.0 and "about 5 min" in text and "0.50 s per sample to stream 20 swapped blocks" in text
    assert "about 3 min" in estimate_text(plain, tmp_path, run_signature(plain, "flux1", "GPU"))  # 200 samples × 1 s
    assert "without block swap: streaming 20 blocks adds to it" in estimate_text(swapping, tmp_path, signature)
    # an earlier run with the same swap already measured the copying
    (earlier / "events.jsonl").write_text("\n".join(json.dumps(e) for e in [
        {"kind": "plan", "data": {"signature": signature, "effective_batch": 2}},
        {"kind": "progress", "data": {"it_per_s": 0.5}}]) + "\n", encoding="utf-8")
    assert estimate_text(swapping, tmp_path, signature, swap_bytes).endswith("(at the speed of run earlier).")


@pytest.mark.parametrize("preset,model,count", [("demo-flux", "flux", 2), ("demo-image", "sd15", 10)],
                         ids=["flux1", "sd15"])
def test_training_runs_the_same_with_block_swap(demo, tmp_path, preset, model, count):
    """The engine's path (studio/residency.py attaches the swap after LoRA): same losses and adapter file."""
    from safetensors.torch import load_file

    from studio.config import config_from_dict
    from studio.events import EventSink
    from studio.loop import train as train_run
    from tests.test_image_training import solid_colours

    data = solid_colours(tmp_path / "colours")

    def run(name, blocks_to_swap):
        events = []
        cfg = config_from_dict({"preset": preset, "base_model": str(getattr(demo, model)), "train_data_dir": str(data),
                                "output_dir": str(tmp_path / name), "sample_every_steps": 0, "sample_prompts": [],
                                "max_train_steps": 3, "batch_size": 2, "save_steps": 0,
                                "gradient_checkpointing": True, "blocks_to_swap": blocks_to_swap})
        result = train_run(cfg, EventSink([events.append]))
        losses = [e.data["loss"] for e in events if e.kind == "progress"]
        streamed = any("streamed from CPU memory" in (e.message or "") for e in events)
        return losses, load_file(str(result.files[0])), streamed

    (losses, adapter, streamed), (swap_losses, swap_adapter, swap_streamed) = run("plain", 0), run("swap", count)
    assert swap_streamed and not streamed and len(losses) == 3
    assert max(abs(a - b) for a, b in zip(losses, swap_losses)) <= 1e-6
    assert adapter.keys() == swap_adapter.keys()
    assert max((adapter[k] - swap_adapter[k]).abs().max().item() for k in adapter) <= 1e-6
