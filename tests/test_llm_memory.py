"""What an LLM run keeps on the card: 4-bit preparation without an fp32 copy of the vocabulary tables, and
checkpointed layers whose inputs wait in CPU memory (studio.activation_offload)."""

import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer

from studio.activation_offload import use_offloaded_checkpointing
from studio.config import config_from_dict
from studio.data.text import IGNORE
from studio.engines import make_engine
from studio.engines.llm import LLMEngine
from studio.events import EventSink
from studio.loop import train
from studio.plan.memory import plan_memory
from studio.plan.models import LLM_REFERENCE

CPU = torch.device("cpu")


class Created(TorchDispatchMode):
    """Every (shape, dtype) an operation creates inside it."""

    def __init__(self):
        super().__init__()
        self.made = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.made.add((tuple(t.shape), t.dtype))
        return out


def bf16_llama(demo, folder):
    """The tiny Llama saved in bf16, as Llama 3.1 8B ships."""
    AutoModelForCausalLM.from_pretrained(demo.llama, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(demo.llama).save_pretrained(folder)
    return folder


def test_4bit_load_never_makes_an_fp32_vocabulary_table_and_the_plan_counts_what_stays(demo, monkeypatch, tmp_path):
    """On CUDA the engine stores the unquantized weights in 16-bit beside the NF4 layers; peft's k-bit preparation
    made fp32 copies of them there (1.96 GiB per 128k-row table of Llama 3.1 8B: the 8 GB card's out-of-memory).
    Here the engine loads on bitsandbytes' CPU backend with the storage dtype it picks on CUDA."""
    from studio.engines import llm

    monkeypatch.setattr(llm.LLMEngine, "four_bit_needs_cuda", False)
    monkeypatch.setattr(llm, "storage_dtype", lambda autocast, device_type: autocast)  # as on CUDA
    base = bf16_llama(demo, tmp_path / "bf16-llama")
    cfg = config_from_dict({"preset": "demo-llm", "base_model": str(base), "train_data_dir": str(demo.chat),
                            "output_dir": "unused", "load_in_4bit": True, "mixed_precision": "bf16",
                            "gradient_checkpointing": True})
    engine = make_engine(cfg, CPU, torch.bfloat16, EventSink())
    with Created() as watch:
        engine.load()
    model = engine.model.get_base_model()
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert (vocab, hidden) not in {shape for shape, dtype in watch.made if dtype == torch.float32}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    unquantized = [p for p in frozen if type(p).__name__ != "Params4bit"]
    assert len(unquantized) < len(frozen) and {p.dtype for p in unquantized} == {torch.bfloat16}
    assert sum(p.shape == (vocab, hidden) for p in unquantized) == 2

    row = next(r for r in plan_memory(cfg, "llm", 8).rows if r.name == "weights, embeddings + norms")
    held = sum(p.numel() * p.element_size() for p in unquantized)
    assert row.gb * 2**30 == pytest.approx(held, rel=1e-6)


def lora_llama(demo, offload):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo.llama)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False)  # lora_B not zero: every LoRA weight gets a gradient
    model = get_peft_model(model, lora)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if offload:
        use_offloaded_checkpointing(model)
    return model


def graph_nodes(loss):
    seen, todo, names = set(), [loss.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo += [next_node for next_node, _ in node.next_functions]
    return names


def test_offloaded_checkpointing_gives_the_same_gradients(demo):
    """Same losses and LoRA gradients, LoRA dropout included (the recompute replays the RNG), with every layer's
    input held outside the graph."""
    ids = torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :10] = IGNORE
    results = []
    for offload in (False, True):
        model = lora_llama(demo, offload)
        torch.manual_seed(1)
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        layers = graph_nodes(loss).count("_OffloadedCheckpointBackward")
        loss.backward()
        results.append((loss.detach(), layers, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain_loss, none, plain), (loss, layers, grads) = results
    assert none == 0 and layers == model.config.num_hidden_layers
    assert abs(loss - plain_loss) <= 1e-6
    assert max((grads[n] - plain[n]).abs().max().item() for n in plain) <= 1e-6
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_the_plan_takes_offloaded_inputs_off_the_card():
    """Llama 3.1 8B (meta device) at 8k tokens: 32 layer inputs of 8,192 × 4,096 bf16 on the card, or two."""
    cfg = config_from_dict({"preset": "llm-chat", "base_model": str(LLM_REFERENCE), "train_data_dir": ".",
                            "output_dir": "unused", "gradient_checkpointing": True, "max_length": 8192,
                            "load_in_4bit": True, "batch_size": 1}, check_paths=False)
    rows = {r.name: r.gb for r in plan_memory(cfg, "llm", 24).rows}
    offloaded = {r.name: r.gb for r in plan_memory(dataclasses.replace(cfg, offload_activations=True), "llm", 24).rows}
    layer_input = 8192 * 4096 * 2 / 2**30
    assert rows["activations"] - offloaded["activations"] == pytest.approx(29 * layer_input, rel=0.05)


def test_the_key_turns_it_on_in_a_run_and_the_run_is_unchanged(demo, tmp_path, monkeypatch):
    original, nodes = LLMEngine.loss, []

    def counting(self, batch, rng):
        loss = original(self, batch, rng)
        nodes.append(graph_nodes(loss).count("_OffloadedCheckpointBackward"))
        return loss

    monkeypatch.setattr(LLMEngine, "loss", counting)

    def run(offload):
        losses = []
        nodes.clear()
        cfg = config_from_dict({"preset": "demo-llm", "base_model": str(demo.llama), "train_data_dir": str(demo.chat),
                                "output_dir": str(tmp_path / str(offload)), "max_train_steps": 3, "save_steps": 0,
                                "sample_every_steps": 0, "sample_prompts": [], "gradient_checkpointing": True,
                                "offload_activations": offload, "lora_dropout": 0.1})
        train(cfg, EventSink([lambda e: e.kind == "progress" and losses.append(e.data["loss"])]))
        return losses, set(nodes)

    (plain, none), (offloaded, layers) = run(False), run(True)
    assert none == {0} and layers == {2}  # the tiny Llama's two layers
    assert len(plain) == 3 and offloaded == pytest.approx(plain, abs=1e-6)
