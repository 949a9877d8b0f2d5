"""Packed rows attended sample by sample (studio.engines.packed_attention): the dense block mask's results, at the
cost of the samples, not of the row."""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

from studio.config import config_from_dict
from studio.data.text_tokens import Example, collate, pack
from studio.engines import make_engine
from studio.engines.packed_attention import DENSE_UP_TO, GROUPED, VARLEN, choose
from studio.llm_loss import causal_lm_loss
from studio.events import EventSink
from studio.loop import train

CPU = torch.device("cpu")


def packed_batch(max_length, lengths):
    rng = random.Random(0)
    examples = []
    for n in lengths:
        ids = [rng.randint(3, 250) for _ in range(n)]
        examples.append(Example(ids, ids, list(range(n))))
    return collate(pack(examples, max_length)[:4], pad_id=0)


# Rows longer than DENSE_UP_TO go sample by sample in power-of-two groups; shorter ones take one block-masked call.
BATCHES = {"grouped": (512, [1, 2, 3, 300, 17, 64, 65, 5, 120, 33] + list(range(8, 400, 9))),
           "block mask": (DENSE_UP_TO, [1, 2, 3, 200, 17, 64, 65, 5, 120, 33] + list(range(8, 90, 4)))}


def forward_backward(demo, attention, batch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo.llama, attn_implementation=attention)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", BATCHES)
@pytest.mark.parametrize("attention", [GROUPED, VARLEN])  # VARLEN hands fp32 (and CPUs) on to GROUPED
def test_same_logits_and_gradients_as_the_dense_mask(demo, kind, attention):
    batch = packed_batch(*BATCHES[kind])
    assert (batch["input_ids"].shape[1] > DENSE_UP_TO) == (kind == "grouped")
    dense_logits, dense_grads = forward_backward(demo, "sdpa", batch)
    logits, grads = forward_backward(demo, attention, batch)
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dense_grads[name], atol=1e-6, rtol=1e-4, msg=name)


aten = torch.ops.aten
# Ops that make the host wait for a GPU to finish its queued work: reading a value, or an output whose size depends
# on values (on the CPU they run as any op: counting them is how a CPU shows a GPU's stalls).
READS = (aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default,
         aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default, aten.masked_select.default,
         aten.repeat_interleave.Tensor)
MASK_INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)


class HostSyncs(TorchDispatchMode):
    """Counts the ops of a pass that would make the host wait for a GPU: READS, and indexing by a boolean mask."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in READS or (func in MASK_INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]))
        return func(*args, **(kwargs or {}))


def test_the_engines_forward_and_backward_wait_for_no_gpu(demo, tmp_path):
    """The engine finds the samples of packed rows and the labelled positions when it collates, on the host; in the
    layers and the loss, each lookup would make the host wait for a GPU (counted here as the ops that do)."""
    cfg = config_from_dict({"preset": "demo-llm", "base_model": str(demo.llama), "train_data_dir": str(demo.chat),
                            "output_dir": str(tmp_path), "packing": True})
    engine = make_engine(cfg, CPU, None, EventSink())
    engine.load()
    batch = packed_batch(*BATCHES["grouped"])
    on_host = engine._found_on_host(dict(batch))  # what engine.collate returns for such rows
    with HostSyncs() as syncs:
        ours = engine.loss(on_host, torch.Generator())
        ours.backward()
    assert syncs.count == 0
    with HostSyncs() as syncs:  # the same loss, the samples and labels looked up on the device
        theirs = causal_lm_loss(engine.model, batch)
    assert syncs.count > engine.model.config.num_hidden_layers  # at least one per layer
    torch.testing.assert_close(ours, theirs)


def test_generation_with_a_kv_cache_is_unchanged(demo):
    tok = AutoTokenizer.from_pretrained(demo.llama)
    inputs = tok("What do bees make?", return_tensors="pt")
    replies = [AutoModelForCausalLM.from_pretrained(demo.llama, attn_implementation=attention).generate(
        **inputs, max_new_tokens=8, do_sample=False) for attention in ("sdpa", GROUPED)]
    assert torch.equal(*replies)


def test_models_beyond_plain_causal_keep_the_dense_mask():
    assert choose(LlamaConfig(), CPU) == GROUPED
    assert choose(Qwen2Config(use_sliding_window=False, sliding_window=4096), CPU) == GROUPED
    assert choose(MistralConfig(sliding_window=4096), CPU) is None


def test_packing_run_uses_it(demo, tmp_path):
    logs, losses = [], []
    cfg = config_from_dict({"preset": "demo-llm", "base_model": str(demo.llama), "train_data_dir": str(demo.chat),
                            "output_dir": str(tmp_path / "run"), "packing": True, "max_train_steps": 2,
                            "save_steps": 0, "sample_every_steps": 0, "sample_prompts": []})
    train(cfg, EventSink([lambda e: e.kind == "log" and logs.append(e.message),
                          lambda e: e.kind == "progress" and losses.append(e.data["loss"])]))
    assert f"Attention for packed rows: {GROUPED}." in logs
    assert len(losses) == 2 and all(loss == loss for loss in losses)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor created inside it, and whether one had two dimensions of `length`."""

    def __init__(self, length):
        super().__init__()
        self.length, self.most, self.square = length, 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
                self.square |= list(t.shape).count(self.length) >= 2
        return out


def train_step_on_one_packed_row(demo, attention, length, longest_sample):
    """Forward and backward of the engine's loss (studio.llm_loss) on one packed row of `length` tokens."""
    rng = random.Random(0)
    lengths = []
    while sum(lengths) < length - longest_sample:
        lengths.append(rng.randint(longest_sample // 4, longest_sample))
    batch = packed_batch(length, lengths + [length - sum(lengths)])
    model = AutoModelForCausalLM.from_pretrained(demo.llama, attn_implementation=attention)
    with LargestTensor(batch["input_ids"].shape[1]) as watch:
        causal_lm_loss(model, batch).backward()
    return batch["input_ids"].shape[1], model.config, watch


def test_a_32k_packed_row_costs_memory_linear_in_its_length(demo):
    """No row × row mask or score matrix: the largest tensor is bounded by length × (vocabulary or heads × longest
    sample), not length²."""
    length, config, watch = train_step_on_one_packed_row(demo, GROUPED, 32768, longest_sample=512)
    assert length == 32768 and not watch.square
    assert watch.most <= length * max(config.vocab_size, config.num_attention_heads * 512)
    _, _, dense = train_step_on_one_packed_row(demo, "sdpa", 2048, longest_sample=512)
    assert dense.square  # transformers' own sdpa path builds the row × row block mask
