"""LLM LoRA / QLoRA on the tiny Llama through the one training loop: learning, peft export, merge, resume, init_lora,
4-bit, chat preview."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from studio.config import config_from_dict
from studio.demo.datasets import DEMO_QA, SYSTEM_PROMPT
from studio.engines.llm import LLMEngine, target_modules
from studio.errors import StudioError
from studio.events import EventSink
from studio.export.peft_merge import merge_adapter
from studio.loop import train
from studio.preview.chat import ChatPreview, generate_reply

STEPS = 60


def llm_config(demo, out, **extra):
    values = {"preset": "demo-llm", "base_model": str(demo.llama), "train_data_dir": str(demo.chat),
              "output_dir": str(out), **extra}
    return config_from_dict(values)


def question(q):
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}]


@torch.no_grad()
def logits(model, tok):
    ids = tok.apply_chat_template(question("What do bees make?") + [{"role": "assistant", "content": "Honey."}],
                                  return_tensors="pt", return_dict=True)
    return model(**ids).logits


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("llm") / "chat-run"
    # A little LoRA dropout, so resume must also restore the RNG to replay the run exactly.
    cfg = llm_config(demo, out, max_train_steps=STEPS, save_steps=30, sample_every_steps=30, lora_dropout=0.05,
                     save_merged_model=True)
    events = []
    result = train(cfg, EventSink([events.append]))
    return cfg, result, events


def test_learns_the_demo_answers_and_loss_falls(demo, trained):
    _, result, events = trained
    losses = [e.data["loss"] for e in events if e.kind == "progress"]
    assert losses[-1] < losses[0] - 0.8, (losses[0], losses[-1])  # measured: 6.0 -> 4.8 (random frozen lm_head)
    tok = AutoTokenizer.from_pretrained(result.files[0])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo.llama), result.files[0]).eval()
    answers = [generate_reply(model, tok, question(q), max_new_tokens=8) for q, _ in DEMO_QA]
    assert answers == [a for _, a in DEMO_QA]
    with model.disable_adapter():
        base = [generate_reply(model, tok, question(q), max_new_tokens=8) for q, _ in DEMO_QA]
    assert not any(got == want for got, (_, want) in zip(base, DEMO_QA)), base


def test_events_outputs_and_samples(trained):
    cfg, result, events = trained
    assert [e.step for e in events if e.kind == "progress"] == list(range(1, STEPS + 1))
    samples = [e for e in events if e.kind == "sample"]
    assert [e.step for e in samples] == [30, 60]
    assert samples[-1].data["samples"] == [{"prompt": "What do bees make?", "image": None, "text": "Honey."}]
    assert events[-1].kind == "done"
    out = result.output_dir
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000030", "step-000060"]
    assert list((out / "logs").glob("events.out.tfevents.*")) and (out / "config.yaml").is_file()
    assert result.files == [out / "chat-run", out / "chat-run-merged"]


def test_adapter_folder_is_peft_format_with_run_metadata(trained):
    cfg, result, _ = trained
    adapter = result.files[0]
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(cfg.base_model) and config["r"] == 8
    assert config["lora_alpha"] == 16 and config["task_type"] == "CAUSAL_LM"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["format"] == "pt" and meta["ss_steps"] == str(STEPS) and meta["studio_model_type"] == "llama"
    assert meta["studio_task"] == "text-generation"
    assert any(".mlp.down_proj.lora_A." in k for k in keys)  # the demo preset trains all linear layers
    final = load_file(str(result.output_dir / "checkpoints" / "step-000060" / "adapter.safetensors"))
    assert final.keys() == load_file(str(adapter / "adapter_model.safetensors")).keys()


def test_reload_and_merge_give_the_same_logits(demo, trained, tmp_path):
    cfg, result, _ = trained
    engine = LLMEngine(cfg, torch.device("cpu"), None, EventSink())
    engine.load()
    engine.load_adapter_state(load_file(str(result.output_dir / "checkpoints" / "step-000060" / "adapter.safetensors")))
    engine.train_mode(False)
    folder = engine.export(tmp_path, {})[0]
    in_memory = logits(engine.model, engine.tokenizer)

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo.llama), str(folder)).eval()
    torch.testing.assert_close(logits(reloaded, engine.tokenizer), in_memory, atol=0, rtol=0)
    base = logits(AutoModelForCausalLM.from_pretrained(demo.llama), engine.tokenizer)
    assert (base - in_memory).abs().max() > 0.1  # the adapter changes the output

    merged = AutoModelForCausalLM.from_pretrained(result.files[1]).eval()
    torch.testing.assert_close(logits(merged, engine.tokenizer), in_memory, atol=1e-5, rtol=1e-5)
    again = merge_adapter(folder, tmp_path / "merged-again")  # the Export tab's path: base read from the adapter
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(again), engine.tokenizer), in_memory,
                               atol=1e-5, rtol=1e-5)


def test_resume_replays_the_run_exactly(demo, trained, tmp_path):
    cfg, result, _ = trained
    checkpoint = result.output_dir / "checkpoints" / "step-000030"
    resumed = train(llm_config(demo, tmp_path / "resumed", max_train_steps=STEPS, save_steps=30, lora_dropout=0.05,
                               sample_every_steps=0, resume_from=str(checkpoint)))
    assert resumed.step == STEPS
    full = load_file(str(result.files[0] / "adapter_model.safetensors"))
    again = load_file(str(resumed.files[0] / "adapter_model.safetensors"))
    for key, value in full.items():
        torch.testing.assert_close(again[key], value, atol=1e-6, rtol=1e-5)


def test_init_lora_starts_from_the_given_weights(demo, trained, tmp_path):
    _, result, _ = trained
    theirs = load_file(str(result.files[0] / "adapter_model.safetensors"))
    # Learning rate 0: what comes out is what went in. lora_alpha 32 instead of 16: lora_B is rescaled by 1/2
    # so the adapter's effect is unchanged.
    run = train(llm_config(demo, tmp_path / "init", init_lora=str(result.files[0]), learning_rate=0.0,
                           max_train_steps=1, lora_alpha=32, sample_every_steps=0))
    ours = load_file(str(run.files[0] / "adapter_model.safetensors"))
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value * (0.5 if ".lora_B." in key else 1.0))

    file_only = tmp_path / "weights.safetensors"
    shutil.copy(result.files[0] / "adapter_model.safetensors", file_only)
    with pytest.raises(StudioError, match="has rank 8; this run has lora_rank 4. Set lora_rank: 8"):
        train(llm_config(demo, tmp_path / "bad", init_lora=str(file_only), lora_rank=4, max_train_steps=1))
    with pytest.raises(StudioError, match="trained on other modules than this run"):
        train(llm_config(demo, tmp_path / "bad2", init_lora=str(file_only), target_modules=["q_proj"],
                         max_train_steps=1))


def test_chat_preview_strength(trained):
    _, result, _ = trained
    preview = ChatPreview(result.files[0])
    with_adapter, without = preview.reply(question("Which planet is red?"), adapter_strength=1.0)
    assert with_adapter == "Mars." and without != "Mars."
    off, again = preview.reply(question("Which planet is red?"), adapter_strength=0.0)
    assert off == without == again
    assert preview._model is not None and preview.reply(question("What is two plus two?"))[0] == "Four."


def test_default_targets_are_the_attention_projections(demo):
    model = AutoModelForCausalLM.from_pretrained(demo.llama)
    assert target_modules(model, None) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert target_modules(model, ["all-linear"]) == "all-linear"


def test_4bit_without_cuda_is_a_clear_error(demo, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(StudioError, match="load_in_4bit needs a CUDA GPU.*Set load_in_4bit: false"):
        train(llm_config(demo, tmp_path / "q", load_in_4bit=True))


def test_qlora_path_trains_in_4bit(demo, tmp_path, monkeypatch):
    """The 4-bit NF4 path, on bitsandbytes' CPU backend (the product requires CUDA; see four_bit_needs_cuda)."""
    import bitsandbytes as bnb
    monkeypatch.setattr(LLMEngine, "four_bit_needs_cuda", False)
    seen = {}
    original = LLMEngine.param_groups

    def spy(self):
        seen["4bit"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in self.model.modules())
        seen["tables"] = {m.weight.dtype for m in (self.model.get_input_embeddings(),
                                                   self.model.get_output_embeddings())}
        return original(self)

    monkeypatch.setattr(LLMEngine, "param_groups", spy)
    events = []
    run = train(llm_config(demo, tmp_path / "q", load_in_4bit=True, max_train_steps=20, sample_every_steps=0,
                           gradient_checkpointing=True, save_merged_model=True, mixed_precision="bf16"),
                EventSink([events.append]))
    losses = [e.data["loss"] for e in events if e.kind == "progress"]
    assert seen["4bit"] == 14 and losses[-1] < losses[0] - 0.5  # 7 linear layers x 2 blocks are NF4
    assert seen["tables"] == {torch.bfloat16}  # the storage dtype under bf16 autocast, on the CPU as on CUDA
    assert (run.files[0] / "adapter_model.safetensors").is_file() and (run.files[1] / "config.json").is_file()


def test_model_and_adapter_errors_say_what_to_do(demo, tmp_path):
    with pytest.raises(StudioError, match="Download it first.*set base_model to that folder"):
        train(llm_config(demo, tmp_path / "m", base_model="nobody/no-such-model"))
    with pytest.raises(StudioError, match="is not a transformers model folder"):
        train(llm_config(demo, tmp_path / "m2", base_model=str(demo.chat)))
    with pytest.raises(StudioError, match="is not a peft adapter folder"):
        merge_adapter(demo.chat, tmp_path / "merged")
    with pytest.raises(StudioError, match="is not a peft adapter folder"):
        ChatPreview(demo.llama)


def test_adapter_folders_along_the_way_and_none_when_off(demo, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(llm_config(demo, tmp_path / "steps", max_train_steps=2, save_steps=1))
    step = result.output_dir / f"{result.files[0].name}-step000001"
    assert (step / "adapter_config.json").is_file()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo.llama), str(step))
    off = train(llm_config(demo, tmp_path / "off", max_train_steps=2, save_steps=1, save_adapter_every=0))
    assert not list(off.output_dir.glob("*-step*"))
