"""LLM LoRA training benchmark on the tiny Llama (CPU or GPU), all figures measured in one run.

1. Tokens/s of the studio trainer (studio.loop.train) vs two references doing the same work (same model,
   conversations, batch size, LoRA targets and rank, AdamW with gradient clipping): a minimal hand-written
   transformers+peft loop, and TRL's SFTTrainer (fp32, no gradient checkpointing, like the others).
   Target: trainer / each reference >= 0.95.
2. The trainer with packing off vs on: the same conversations, padded batches vs rows packed to max_length.

Tokens are the real (non-padding) tokens of the dataset; a run is timed from the end of its first epoch (which
pays for warm-up) to the end of its last, so model loading and tokenization are not counted.

Run: `.venv/bin/python bench/llm_train.py` (add --write to update bench/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local models only: never wait on a hub lookup
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from bench.results import update_results  # noqa: E402
from studio.config import config_from_dict  # noqa: E402
from studio.demo import ensure_demo  # noqa: E402
from studio.demo.datasets import DEMO_QA, SYSTEM_PROMPT  # noqa: E402
from studio.events import EventSink  # noqa: E402
from studio.loop import train  # noqa: E402

CONVERSATIONS, EPOCHS, BATCH, RANK, MAX_LENGTH, REPEATS = 96, 4, 8, 8, 256, 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_chats(folder: Path) -> list[list[dict]]:
    """Conversations of varied length (the question repeated 1-8 times), so batches need padding."""
    chats = []
    for i in range(CONVERSATIONS):
        q, a = DEMO_QA[i % len(DEMO_QA)]
        chats.append([{"role": "system", "content": SYSTEM_PROMPT},
                      {"role": "user", "content": " ".join([q] * (1 + i * 5 % 8))},
                      {"role": "assistant", "content": a}])
    folder.mkdir(parents=True)
    (folder / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats), encoding="utf-8")
    return chats


def trainer_tokens_per_s(model: Path, data: Path, out: Path, packing: bool) -> tuple[float, int]:
    """(real tokens/s, tokens per epoch) of studio.loop.train."""
    epoch_ends: dict[int, float] = {}
    tokens = [0]

    def listen(event):
        if event.kind == "progress":
            epoch_ends[event.data["epoch"]] = time.perf_counter()
        elif event.kind == "log" and "tokens" in event.data:
            tokens[0] = event.data["tokens"]

    cfg = config_from_dict({"task_type": "text-generation", "base_model": str(model), "train_data_dir": str(data),
                            "output_dir": str(out), "batch_size": BATCH, "lora_rank": RANK, "epochs": EPOCHS,
                            "max_length": MAX_LENGTH, "packing": packing, "save_steps": 0, "learning_rate": 1e-4,
                            "max_grad_norm": 1.0, "target_modules": TARGETS})
    train(cfg, EventSink([listen]))
    return tokens[0] * (EPOCHS - 1) / (epoch_ends[EPOCHS - 1] - epoch_ends[0]), tokens[0]


def reference_tokens_per_s(model_dir: Path, chats: list[list[dict]]) -> tuple[float, int]:
    """The loop a transformers+peft user would write by hand: tokenize, pad with an attention mask, step."""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    encoded = [tok.apply_chat_template(c, return_dict=True)["input_ids"][:MAX_LENGTH] for c in chats]
    tokens = sum(len(ids) for ids in encoded)
    gen = torch.Generator().manual_seed(0)
    epoch_ends = []
    for _ in range(EPOCHS):
        order = torch.randperm(len(encoded), generator=gen).tolist()
        for start in range(0, len(order), BATCH):
            batch = tok.pad({"input_ids": [encoded[i] for i in order[start:start + BATCH]]}, return_tensors="pt")
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(**batch, labels=labels, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        epoch_ends.append(time.perf_counter())
    return tokens * (EPOCHS - 1) / (epoch_ends[-1] - epoch_ends[0]), tokens


def trl_tokens_per_s(model_dir: Path, chats: list[list[dict]], out: Path) -> tuple[float, int]:
    """TRL's SFTTrainer as its docs set it up, with the settings the other loops use."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    epoch_ends: list[float] = []

    class EpochTimes(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            epoch_ends.append(time.perf_counter())

    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS,
                     learning_rate=1e-4, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="constant",
                     max_length=MAX_LENGTH, gradient_checkpointing=False, bf16=False, report_to="none",
                     save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                         train_dataset=Dataset.from_list([{"messages": c} for c in chats]),
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[EpochTimes()],
                         peft_config=LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, task_type="CAUSAL_LM"))
    tokens = sum(len(row["input_ids"]) for row in trainer.train_dataset)
    trainer.train()
    return tokens * (EPOCHS - 1) / (epoch_ends[-1] - epoch_ends[0]), tokens


def main() -> str:
    tmp = Path(tempfile.mkdtemp())
    demo = ensure_demo(tmp / "ws")
    chats = make_chats(tmp / "data")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs: dict[str, list[float]] = {"reference": [], "trl": [], "trainer": [], "packed": []}
    counts = {}
    for i in range(REPEATS):  # interleaved, order alternating: whichever runs first in a round is slower
        round_ = [("reference", lambda: reference_tokens_per_s(demo.llama, chats)),
                  ("trl", lambda: trl_tokens_per_s(demo.llama, chats, tmp / f"trl{i}")),
                  ("trainer", lambda: trainer_tokens_per_s(demo.llama, tmp / "data", tmp / f"run{i}", False)),
                  ("packed", lambda: trainer_tokens_per_s(demo.llama, tmp / "data", tmp / f"packed{i}", True))]
        for name, run in (round_ if i % 2 == 0 else round_[::-1]):
            rate, counts[name] = run()
            runs[name].append(rate)
    tok = AutoTokenizer.from_pretrained(demo.llama)
    lengths = [len(tok.apply_chat_template(c, return_dict=True)["input_ids"]) for c in chats]
    if len(set(counts.values())) != 1:
        raise SystemExit(f"the loops saw different data: tokens per epoch {counts}")
    rate = {name: statistics.median(values) for name, values in runs.items()}
    lines = [f"Tiny Llama (hidden 64, 2 layers), {CONVERSATIONS} conversations of {min(lengths)}-{max(lengths)} tokens "
             f"({counts['trainer']} tokens/epoch), batch {BATCH}, LoRA rank {RANK} on q/k/v/o, {EPOCHS} epochs "
             f"(first not timed), on {device.type}, torch {torch.__version__}, {torch.get_num_threads()} threads.", "",
             "| loop | tokens/s (median of 4, order alternating) |", "|---|---|",
             f"| hand-written transformers+peft (padding + attention mask) | {rate['reference']:,.0f} |",
             f"| TRL {version('trl')} SFTTrainer (padding, fused AdamW) | {rate['trl']:,.0f} |",
             f"| studio trainer, packing off | {rate['trainer']:,.0f} |",
             f"| studio trainer, packing on (max_length {MAX_LENGTH}) | {rate['packed']:,.0f} |", "",
             f"**trainer / reference = {rate['trainer'] / rate['reference']:.3f}, trainer / TRL = "
             f"{rate['trainer'] / rate['trl']:.3f}** (target >= 0.95); "
             f"packing on / off = {rate['packed'] / rate['trainer']:.2f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    report = main()
    print(report)
    if "--write" in sys.argv:
        update_results("llm_train", report)
