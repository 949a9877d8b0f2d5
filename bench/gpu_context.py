"""The longest context of Llama 3.1 8B QLoRA r=32 with checkpointing on a 24 GB card: a plain transformers+peft
loop against the studio trainer's pieces, each searched by one update per length (double, then bisect)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from gpu_cases import CONTEXT_CARD_GB, CONTEXT_RANK, MODEL_NAMES, describe_cfg
from gpu_device import Cuda
from gpu_log import error_text, say
from gpu_session import OUT_OF_TIME, Session
from studio.plan.longest import longest_max_length
from studio.plan.reference import fit_reference

LONG_CONTEXT = 32768  # the max_length the studio side is fitted for


def search_longest(fits: Callable[[int], bool], start: int, limit: int, granularity: int = 256,
                   out_of_time: Callable[[], bool] = lambda: False) -> tuple[int, int | None]:
    """(longest length that fits, shortest that did not or None) for a `fits(length)` that holds below some length.

    Doubles from `start` up to `limit` until a length fails (halves when `start` already fails), then bisects until
    the gap is under an eighth of the length that fits (and never finer than `granularity`)."""
    ok, bad = 0, None
    length = start
    while not out_of_time():
        if not fits(length):
            bad = length
            break
        ok = length
        if length >= limit:
            break
        length = min(length * 2, limit)
    if not ok and bad is not None:
        length = bad // 2
        while length >= granularity and not out_of_time():
            if fits(length):
                ok = length
                break
            bad, length = length, length // 2
    while ok and bad is not None and bad - ok > max(granularity, ok // 8) and not out_of_time():
        middle = (ok + bad) // 2 // granularity * granularity
        if middle <= ok or middle >= bad:
            break
        if fits(middle):
            ok = middle
        else:
            bad = middle
    return ok, bad


def within_share(tries: list, card_gb: float) -> int | None:
    """The longest length that trained with its measured peak (allocated + CUDA context) within the share of the
    card a plan may use (report.FITS): the planner's kind of "fits", so the two compare in one table."""
    from studio.plan.memory import CUDA_CONTEXT_GB
    from studio.plan.report import FITS
    return max((length for length, ok, _, peak, _ in tries
                if ok and peak is not None and peak + CUDA_CONTEXT_GB <= FITS * card_gb), default=None)


def _is_oom(exc: BaseException) -> bool:
    """torch's out-of-memory error, or the RuntimeError some kernels raise for it instead."""
    import torch
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


class PlainLoop:
    """What a transformers+peft user writes for QLoRA: NF4 loading, prepare_model_for_kbit_training (its default
    gradient checkpointing), the same LoRA, the model's own loss."""

    def __init__(self, model_dir: Path, cfg, gpu: Cuda):
        import torch
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from studio.engines.llm import target_modules
        self.torch, self.gpu = torch, gpu
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": gpu.device})
        model.config.use_cache = False
        model = prepare_model_for_kbit_training(model)
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.effective_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=target_modules(model, cfg.target_modules), task_type="CAUSAL_LM")
        self.model = get_peft_model(model, lora)
        self.model.train()
        self.vocab = self.model.config.vocab_size
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=cfg.learning_rate)

    def step(self, length: int) -> float:
        torch = self.torch
        ids = torch.randint(0, self.vocab, (1, length), device=self.gpu.device)
        try:
            with torch.autocast(self.gpu.device, dtype=torch.bfloat16):
                loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            self.optimizer.step()
            return loss.item()
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.model = self.optimizer = None


class StudioLoop:
    """The trainer's own pieces for one update: engine.load (4-bit loading, k-bit preparation, checkpointing, LoRA),
    engine.collate and engine.loss, studio.optim.build_optimizer, the loop's gradient clipping."""

    def __init__(self, cfg, gpu: Cuda):
        import torch

        from studio.engines import make_engine
        from studio.events import EventSink
        from studio.hardware import autocast_dtype
        from studio.optim import build_optimizer
        self.torch, self.cfg = torch, cfg
        self.device = torch.device(gpu.device)
        self.autocast = autocast_dtype(cfg.mixed_precision, self.device)
        self.engine = make_engine(cfg, self.device, self.autocast, EventSink())
        self.engine.load()
        self.engine.train_mode(True)
        self.optimizer = build_optimizer(cfg, self.engine.param_groups(), self.device)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.vocab = self.engine.model.config.vocab_size
        self.rng = torch.Generator().manual_seed(cfg.seed)

    def step(self, length: int) -> float:
        from contextlib import nullcontext

        from studio.data.text_tokens import Example
        torch = self.torch
        ids = torch.randint(0, self.vocab, (length,), generator=self.rng).tolist()
        self.engine.examples = [Example(ids, list(ids), list(range(length)))]
        batch = self.engine.collate([0], 0)
        try:
            with torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else nullcontext():
                loss = self.engine.loss(batch, self.rng)
            loss.backward()
            if self.cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            self.optimizer.step()
            return loss.item()
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.engine = self.optimizer = self.params = None


def _search_side(session: Session, make_loop: Callable, start: int, seconds: float) -> dict:
    """Load one loop, then search its longest trainable length within `seconds` (and the session's budget)."""
    gpu, setup = session.gpu, session.setup
    side: dict = {"tries": []}
    loop = None
    try:
        loaded = time.perf_counter()
        loop = make_loop()
        side["load_s"] = time.perf_counter() - loaded
        side["baseline_alloc_gb"] = gpu.allocated_gb()
        stop_at = time.monotonic() + seconds

        def fits(length: int) -> bool:
            gpu.reset_peak()
            began, ok, loss = time.perf_counter(), True, None
            try:
                loss = loop.step(length)
            except Exception as exc:  # noqa: BLE001
                if not _is_oom(exc):
                    raise
                ok = False
            gpu.free()  # after the except block: the error's frames (and the step's tensors) are gone
            side["tries"].append([length, ok, time.perf_counter() - began, gpu.peak_allocated_gb(), loss])
            say(f"   {length:>7,} tokens: {'ok' if ok else 'out of memory'} ({side['tries'][-1][2]:.1f} s)")
            return ok

        side["longest"], side["first_failed"] = search_longest(
            fits, start, setup.context_limit, out_of_time=lambda: time.monotonic() > stop_at or session.out_of_time())
        if side["first_failed"] is None and side["longest"] < setup.context_limit:
            side["note"] = "search stopped by the time limit"
    except Exception as exc:  # noqa: BLE001
        side["error"] = error_text(exc)
    finally:
        if loop is not None:
            loop.close()
        loop = None
        gpu.free()
    return side


def run_context(session: Session, model_dir: Path, data_dir: Path) -> dict:
    """The longest context of the plain loop and of the studio trainer, QLoRA r=32 with checkpointing, 24 GB."""
    from studio.plan.memory import plan_memory
    gpu, setup = session.gpu, session.setup
    row: dict = {"id": "llm-ctx", "kind": "context", "family": "llm", "model": MODEL_NAMES["llm"],
                 "card_gb": CONTEXT_CARD_GB, "status": "pending"}
    if session.out_of_time():
        row["status"] = OUT_OF_TIME
        return row
    try:
        # The fit's settings for a long max_length (it turns offload_activations on where the card needs it).
        fitted = fit_reference(MODEL_NAMES["llm"], CONTEXT_CARD_GB, load_in_4bit=True, lora_rank=CONTEXT_RANK,
                               gradient_checkpointing=True, batch_size=1, gradient_accumulation_steps=1,
                               max_length=LONG_CONTEXT, optimizer="adamw")  # the plain loop's optimizer
        cfg = dataclasses.replace(fitted.cfg, base_model=str(model_dir), train_data_dir=str(data_dir),
                                  output_dir=str(session.work / "runs" / "context"),
                                  max_length=setup.max_length or fitted.cfg.max_length)
        row["config"], row["start"] = describe_cfg(cfg, "llm"), setup.context_start
        say(f"-> llm-ctx: {row['config']}")
        plan_at = lambda n: plan_memory(dataclasses.replace(fitted.cfg, max_length=n), "llm", CONTEXT_CARD_GB)  # noqa
        row["planned_longest"] = longest_max_length(fitted.cfg, "llm", CONTEXT_CARD_GB)  # what --plan prints
        gpu.set_card(CONTEXT_CARD_GB)
        if gpu.dry:
            from studio.engines.llm import LLMEngine
            LLMEngine.four_bit_needs_cuda = False  # bitsandbytes' CPU backend, as the tests use it
        # The plain loop's lengths are short and quick; the studio's search starts where the plain one ended.
        say("   plain transformers+peft loop:")
        row["plain"] = _search_side(session, lambda: PlainLoop(model_dir, cfg, gpu), setup.context_start,
                                    max(30.0, 0.35 * (session.deadline - time.monotonic())))
        start = max(setup.context_start, row["plain"].get("longest") or 0)
        say("   studio:")
        row["studio"] = _search_side(session, lambda: StudioLoop(cfg, gpu), start,
                                     max(30.0, session.deadline - time.monotonic()))
        for side in ("plain", "studio"):
            row[side]["longest_within_share"] = within_share(row[side]["tries"], CONTEXT_CARD_GB)
        longest = row["studio"].get("longest")
        best = next((t for t in row["studio"]["tries"] if t[1] and t[0] == longest), None)
        if longest and best and best[3] is not None:
            row["planned_alloc_at_longest_gb"] = plan_at(longest).allocated_gb
            row["measured_alloc_at_longest_gb"] = best[3]
        errors = [f"{side}: {row[side]['error']}" for side in ("plain", "studio") if row[side].get("error")]
        row["status"] = "; ".join(errors) if errors else "ok"
    except Exception as exc:  # noqa: BLE001
        row["status"] = f"error: {error_text(exc)}"
    finally:
        gpu.free()
    return row

