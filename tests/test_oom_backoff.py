"""Out-of-memory back-off: the ladder (studio/backoff.py) and the loop retrying the same update with smaller settings.

The out-of-memory errors are real `torch.OutOfMemoryError`s raised by a global forward pre-hook on the real UNet /
Llama at chosen training forward calls, so the CPU exercises the path a GPU takes.
"""

import threading
from contextlib import contextmanager

from PIL import Image

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from transformers import LlamaModel  # the decoder: the LLM engine runs it, then its chunked loss

from studio.backoff import (BLOCK_SWAP, CHECKPOINTING, MAX_LENGTH, MICRO_BATCH, RESOLUTION, apply_backoff, effective_batch,
                            next_backoff)
from studio.cli import tqdm_listener
from studio.config import TEXT_TASK, RunConfig, config_from_dict, load_config, read_yaml
from studio.errors import StudioError
from studio.events import Event, EventSink
from studio.jobs import JobRunner
from studio.loop import train


# --- the ladder ------------------------------------------------------------------------------------------------------

def ladder(cfg):
    steps = []
    while (change := next_backoff(cfg)) is not None:
        steps.append(change)
        cfg = apply_backoff(cfg, change)
    return steps, cfg


def test_image_ladder_order():
    start = RunConfig(batch_size=4, gradient_accumulation_steps=1, resolution=512)
    steps, last = ladder(start)
    kinds = [s.kind for s in steps]
    swaps = kinds.count(BLOCK_SWAP)  # SD1.5's 38 swappable UNet units, 1/8 more per rung, all but the first
    assert kinds == [MICRO_BATCH, MICRO_BATCH, CHECKPOINTING] + [BLOCK_SWAP] * swaps + [RESOLUTION] * 4
    assert [s.changes["blocks_to_swap"][1] for s in steps[3:3 + swaps]] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 37]
    assert steps[3].describe(5) == "Out of memory at step 5: blocks_to_swap 0→4, continuing"
    assert steps[0].changes == {"batch_size": (4, 2), "gradient_accumulation_steps": (1, 2)}
    assert steps[1].changes == {"batch_size": (2, 1), "gradient_accumulation_steps": (2, 4)}
    steps = steps[:3] + steps[3 + swaps:]
    assert [s.changes["resolution"] for s in steps[3:]] == [(512, 448), (448, 384), (384, 320), (320, 256)]
    assert (last.batch_size, last.gradient_accumulation_steps, last.gradient_checkpointing, last.resolution) == (
        1, 4, True, 256)
    assert effective_batch(last) == effective_batch(start) == 4
    assert start.batch_size == 4 and not start.gradient_checkpointing  # apply_backoff returns a copy
    assert steps[0].describe(312) == "Out of memory at step 312: micro-batch 4→2, accumulation 1→2, continuing"
    assert steps[2].describe(5) == "Out of memory at step 5: gradient checkpointing on, continuing"
    assert steps[3].describe(5) == "Out of memory at step 5: resolution 512→448, continuing"


def test_text_ladder_order_and_floors():
    steps, last = ladder(RunConfig(task_type=TEXT_TASK, batch_size=6, gradient_accumulation_steps=2, max_length=1024))
    assert [s.kind for s in steps] == [MICRO_BATCH, MICRO_BATCH, CHECKPOINTING] + [MAX_LENGTH] * 4
    # 6 → 3 → 1: an odd micro-batch drops to its largest divisor, so the effective batch stays 12.
    assert [(s.changes["batch_size"], s.changes["gradient_accumulation_steps"]) for s in steps[:2]] == [
        ((6, 3), (2, 4)), ((3, 1), (4, 12))]
    assert [s.changes["max_length"][1] for s in steps[3:]] == [512, 256, 128, 64]
    assert (last.max_length, effective_batch(last)) == (64, 12)
    assert steps[3].describe(9) == "Out of memory at step 9: max_length 1024→512, continuing"


def test_already_below_the_floors_nothing_is_lowered():
    assert next_backoff(RunConfig(batch_size=1, gradient_checkpointing=True, resolution=192, blocks_to_swap=37)) is None
    assert next_backoff(RunConfig(task_type=TEXT_TASK, batch_size=1, gradient_checkpointing=True,
                                  max_length=48)) is None
    odd = next_backoff(RunConfig(batch_size=1, gradient_checkpointing=True, resolution=300, blocks_to_swap=37))
    assert odd.changes == {"resolution": (300, 256)}  # one notch down lands on the 64 px grid
    assert next_backoff(RunConfig(task_type=TEXT_TASK, batch_size=1, gradient_checkpointing=True,
                                  max_length=100)).changes == {"max_length": (100, 64)}


# --- the loop --------------------------------------------------------------------------------------------------------

@contextmanager
def out_of_memory_at(module_type, fails):
    """Raise torch.OutOfMemoryError at the n-th (1-based) training forward of a `module_type` module when
    `fails(n)`; yields what it saw: the call count, the module, the first argument's shape per successful call."""
    seen = {"calls": 0, "module": None, "shapes": []}

    def hook(module, args):
        if not isinstance(module, module_type) or not torch.is_grad_enabled() or module.device.type == "meta":
            return  # the memory planner's shape-only trace is not a training step
        seen["calls"] += 1
        seen["module"] = module
        if fails(seen["calls"]):
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: forward {seen['calls']})")
        seen["shapes"].append(tuple(args[0].shape) if args else None)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def image_config(demo, out, **extra):
    return config_from_dict({"preset": "demo-image", "base_model": str(demo.sd15), "train_data_dir": str(demo.images),
                             "output_dir": str(out), "sample_every_steps": 0, "sample_prompts": [], **extra})


def llm_config(demo, out, **extra):
    return config_from_dict({"preset": "demo-llm", "base_model": str(demo.llama), "train_data_dir": str(demo.chat),
                             "output_dir": str(out), "sample_every_steps": 0, "sample_prompts": [], "save_steps": 0,
                             **extra})


def two_images(folder):
    """Two flat-colour images: the fewest latents to re-encode when the resolution drops."""
    folder.mkdir(parents=True)
    for name, rgb in {"red": (230, 30, 30), "blue": (30, 40, 230)}.items():
        Image.new("RGB", (64, 64), rgb).save(folder / f"{name}.png")
    (folder / "metadata.csv").write_text("filename,prompt\nred.png,a red picture\nblue.png,a blue picture\n")
    return folder


def backoffs(events):
    return [e for e in events if e.kind == "backoff"]


def test_image_oom_halves_micro_batch_and_a_resume_keeps_it(demo, tmp_path):
    common = dict(max_train_steps=4, save_steps=2, gradient_accumulation_steps=1)
    out, events, stop = tmp_path / "run", [], threading.Event()
    listen = [events.append, lambda e: e.kind == "progress" and e.step == 2 and stop.set()]
    with out_of_memory_at(UNet2DConditionModel, lambda n: n == 1) as seen:
        first = train(image_config(demo, out, batch_size=4, **common), EventSink(listen), stop)
    assert first.stopped and first.step == 2 and torch.isfinite(torch.tensor(first.last_loss))
    [backoff] = backoffs(events)
    assert backoff.message == "Out of memory at step 1: micro-batch 4→2, accumulation 1→2, continuing"
    assert backoff.data == {"change": MICRO_BATCH, "changes": {"batch_size": [4, 2],
                                                               "gradient_accumulation_steps": [1, 2]}}
    assert [e.step for e in events if e.kind == "progress"] == [1, 2]  # the failed update is retried, not lost
    assert max(shape[0] for shape in seen["shapes"]) == 2
    saved = read_yaml(out / "config.yaml")
    assert (saved["batch_size"], saved["gradient_accumulation_steps"]) == (2, 2)

    # A rerun from the saved config starts with the settings that fit and continues from the checkpoint.
    with out_of_memory_at(UNet2DConditionModel, lambda n: False) as seen:
        resumed = train(load_config(out / "config.yaml", {"resume_from": "latest"}))
    assert resumed.step == 4 and not resumed.stopped and max(shape[0] for shape in seen["shapes"]) == 2
    # The retried update is the same update: the run equals one that used micro-batch 2 from the start.
    clean = train(image_config(demo, tmp_path / "clean", batch_size=2, **{**common, "gradient_accumulation_steps": 2}))
    ours, theirs = load_file(str(resumed.files[0])), load_file(str(clean.files[0]))
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)


def test_image_oom_at_micro_batch_one_checkpoints_then_swaps_blocks(demo, tmp_path):
    out, events = tmp_path / "run", []
    cfg = image_config(demo, out, train_data_dir=str(two_images(tmp_path / "two")), batch_size=1,
                       gradient_accumulation_steps=2, resolution=320, max_train_steps=2, save_steps=0)
    with out_of_memory_at(UNet2DConditionModel, lambda n: n in (1, 2)) as seen:
        result = train(cfg, EventSink([events.append]))
    assert result.step == 2 and torch.isfinite(torch.tensor(result.last_loss))
    assert [e.message for e in backoffs(events)] == [
        "Out of memory at step 1: gradient checkpointing on, continuing",
        "Out of memory at step 1: blocks_to_swap 0→1, continuing"]  # before the resolution (the ladder's test)
    assert seen["module"].is_gradient_checkpointing
    assert all(shape[2] * shape[3] == 40 * 40 for shape in seen["shapes"])  # still 320 px
    saved = read_yaml(out / "config.yaml")
    assert saved["gradient_checkpointing"] is True and saved["resolution"] == 320 and saved["blocks_to_swap"] == 1
    assert (saved["batch_size"], saved["gradient_accumulation_steps"]) == (1, 2)


def test_llm_oom_lowers_micro_batch_then_checkpoints_then_max_length(demo, tmp_path):
    out, events = tmp_path / "run", []
    cfg = llm_config(demo, out, batch_size=2, max_length=256, max_train_steps=3)
    with out_of_memory_at(LlamaModel, lambda n: n in (1, 2, 3)) as seen:
        result = train(cfg, EventSink([events.append]))
    assert result.step == 3 and torch.isfinite(torch.tensor(result.last_loss))
    assert [e.data["change"] for e in backoffs(events)] == [MICRO_BATCH, CHECKPOINTING, MAX_LENGTH]
    assert backoffs(events)[-1].message == "Out of memory at step 1: max_length 256→128, continuing"
    assert len([e for e in events if e.kind == "log" and "tokens" in e.data]) == 2  # tokenized again at 128
    assert seen["module"].is_gradient_checkpointing
    saved = read_yaml(out / "config.yaml")
    assert (saved["batch_size"], saved["gradient_accumulation_steps"], saved["gradient_checkpointing"],
            saved["max_length"]) == (1, 2, True, 128)


def test_nothing_left_to_lower_stops_with_a_checkpoint_and_advice(demo, tmp_path):
    out, events = tmp_path / "run", []
    cfg = llm_config(demo, out, batch_size=1, max_length=64, gradient_checkpointing=True, max_train_steps=10)
    with out_of_memory_at(LlamaModel, lambda n: n >= 3):
        with pytest.raises(StudioError, match="Out of memory at step 3 even with micro-batch 1, gradient "
                                              "checkpointing on and max_length 64.*load_in_4bit"):
            train(cfg, EventSink([events.append]))
    assert (out / "checkpoints" / "step-000002" / "state.pt").is_file()
    assert events[-1].kind == "failed" and "lower lora_rank" in events[-1].message
    assert not backoffs(events)


def test_backoff_reaches_the_train_tab_log_and_the_cli(demo, tmp_path, capsys):
    runner = JobRunner()
    with out_of_memory_at(UNet2DConditionModel, lambda n: n == 1):
        runner.start(image_config(demo, tmp_path / "job", batch_size=2, max_train_steps=1))
        state = runner.wait(120)
    assert state.status == "done"
    assert "[backoff] Out of memory at step 1: micro-batch 2→1, accumulation 1→2, continuing" in state.log

    listen = tqdm_listener()
    listen(Event("start", 0, 5))
    listen(Event("backoff", 0, 5, "Out of memory at step 1: micro-batch 2→1, accumulation 1→2, continuing"))
    listen(Event("done", 5, 5, "Finished"))
    captured = capsys.readouterr()
    assert "micro-batch 2→1" in captured.out + captured.err
