"""Held-out validation loss (validation_split / validation_dir / validate_every) on the tiny SD and Llama, and the
loop's Sample now / Save now requests."""

import dataclasses
import json
import threading

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from studio.config import ConfigError
from studio.data.images import inspect_dataset
from studio.data.text import read_dataset
from studio.engines import make_engine
from studio.data.held_out import split_held_out
from studio.errors import StudioError
from studio.events import EventSink, read_events
from studio.loop import Requests, train
from tests.test_flux_training import flux_config
from tests.test_image_training import image_config, solid_colours
from tests.test_llm_training import llm_config

CPU = torch.device("cpu")


def loaded_engine(cfg):
    engine = make_engine(cfg, CPU, None, EventSink())
    engine.load()
    return engine


def validation_losses(out):
    return [(e.step, e.data["loss"]) for e in read_events(out / "events.jsonl") if e.kind == "validation"]


def chat_file(path, pairs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in pairs), encoding="utf-8")
    return path


# --- images ----------------------------------------------------------------------------------------------------------

def sd_config(demo, out, **extra):
    return image_config(demo.sd15, demo.images, out, max_train_steps=2, save_steps=1, validation_split=0.25,
                        **extra)


def test_image_validation_is_the_same_in_two_runs_and_follows_training(demo, tmp_path):
    runs = [train(sd_config(demo, tmp_path / name)) for name in ("a", "b")]
    first, second = (validation_losses(tmp_path / name) for name in ("a", "b"))
    assert [step for step, _ in first] == [1, 2]  # every checkpoint (save_steps) and at the end
    assert first == second  # bit-identical: fixed noise, timesteps and order
    assert first[0][1] != first[1][1]  # and it measures the weights as they train
    best_step, best = min(first, key=lambda pair: pair[1])[0], min(loss for _, loss in first)
    assert (runs[0].best_val_loss, runs[0].best_val_step) == (best, best_step)
    done = read_events(tmp_path / "a" / "events.jsonl")[-1]
    assert done.kind == "done" and (done.data["best_val_loss"], done.data["best_val_step"]) == (best, best_step)
    scalars = EventAccumulator(str(tmp_path / "a" / "logs")).Reload().Scalars("train/validation_loss")
    assert [(s.step, pytest.approx(s.value)) for s in scalars] == first


def test_held_out_images_are_never_trained_on(demo, tmp_path):
    colours = solid_colours(tmp_path / "colours")  # one caption per image: the batches' captions say what trained
    engine = loaded_engine(image_config(demo.sd15, colours, tmp_path / "run", validation_split=0.25, repeats=2,
                                        caption_dropout=0.0))
    everything = {item.caption for item in inspect_dataset(colours).items}
    held = {item.caption for item in engine.items[engine.train_count:]}
    assert len(held) == 1 and held < everything
    trained = {caption for epoch in range(3) for group in engine.batches(epoch, 2)
               for caption in engine.collate(group, epoch).captions}
    assert trained == everything - held
    def split(seed):
        return frozenset(split_held_out(list(range(20)), dataclasses.replace(engine.cfg, seed=seed), "images")[1])
    assert split(42) == split(42) and len(split(42)) == 5
    assert len({split(seed) for seed in range(5)}) > 1  # the split follows the seed


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_image_validation_pass_is_repeatable_in_eval_mode_and_restores_training(demo, tmp_path, family):
    make_config = flux_config if family == "flux" else image_config
    engine = loaded_engine(make_config(getattr(demo, family), demo.images, tmp_path / "run", validation_split=0.25,
                                       lora_dropout=0.5))
    engine.train_mode(True)
    assert engine.validation_loss() == engine.validation_loss()  # eval mode: no LoRA dropout, same draws
    assert engine.denoiser.training


def test_validation_dir_holds_out_a_separate_folder(demo, tmp_path):
    held = solid_colours(tmp_path / "held")
    cfg = image_config(demo.sd15, demo.images, tmp_path / "run", max_train_steps=2, validation_dir=str(held),
                       validate_every=0)
    engine = loaded_engine(cfg)
    assert engine.num_samples() == len(inspect_dataset(demo.images).items)  # every training image still trains
    assert {item.path.parent for item in engine.items[engine.train_count:]} == {held}
    result = train(cfg)
    assert [step for step, _ in validation_losses(tmp_path / "run")] == [2]  # validate_every 0: only at the end
    assert result.best_val_step == 2


# --- LLM -------------------------------------------------------------------------------------------------------------

def test_llm_validation_is_the_same_in_two_runs_and_holds_conversations_out(demo, tmp_path):
    def cfg(out):
        return llm_config(demo, out, max_train_steps=4, save_steps=0, validate_every=2, validation_split=0.34,
                          sample_prompts=[])
    for name in ("a", "b"):
        train(cfg(tmp_path / name))
    first = validation_losses(tmp_path / "a")
    assert [step for step, _ in first] == [2, 4] and first == validation_losses(tmp_path / "b")
    assert first[1][1] != first[0][1]  # it measures the weights as they train
    engine = loaded_engine(cfg(tmp_path / "c"))
    records = read_dataset(demo.chat).records
    held = [r.messages for r in engine.held_out_records]
    assert len(held) == round(len(records) * 0.34) and held
    assert not any(r.messages in held for r in engine.records)
    assert len(engine.records) + len(held) == len(records)


def test_llm_validation_dir_and_resume_keeps_the_best(demo, tmp_path):
    held = chat_file(tmp_path / "held" / "chat.jsonl", [("What do cows say?", "Moo."), ("Sky colour?", "Blue.")])
    out = tmp_path / "run"
    # learning_rate 0: the weights, and so the validation loss, stay put; a tie keeps the earlier step, so the best
    # can only stay at step 1 if the resumed run took it over from the checkpoint.
    def cfg(**extra):
        return llm_config(demo, out, max_train_steps=2, save_steps=1, learning_rate=0.0, validation_dir=str(held),
                          sample_prompts=[], **extra)
    stop = threading.Event()
    stop_at_1 = lambda e: e.kind == "progress" and e.step == 1 and stop.set()  # noqa: E731
    first = train(cfg(), EventSink([stop_at_1]), stop)
    assert first.stopped and first.best_val_step == 1  # a stopped run validates too
    resumed = train(cfg(resume_from="latest"))
    losses = validation_losses(out)
    assert [step for step, _ in losses] == [1, 2] and losses[0][1] == losses[1][1]
    assert (resumed.best_val_loss, resumed.best_val_step) == (losses[0][1], 1)


def test_without_held_out_samples_nothing_is_validated(demo, tmp_path):
    result = train(llm_config(demo, tmp_path / "run", max_train_steps=2, save_steps=1, sample_prompts=[]))
    events = read_events(tmp_path / "run" / "events.jsonl")
    assert not [e for e in events if e.kind == "validation"]
    assert result.best_val_loss is None and events[-1].data["best_val_loss"] is None
    tokens = [e.data["tokens"] for e in events if e.kind == "log" and "tokens" in e.data]
    assert len(tokens) == 1  # the training data's counts, as before


# --- config errors ---------------------------------------------------------------------------------------------------

def test_split_and_folder_together_is_one_config_error(demo, tmp_path):
    with pytest.raises(ConfigError, match="validation_split.*validation_dir") as err:
        image_config(demo.sd15, demo.images, tmp_path / "run", validation_split=0.2, validation_dir=str(demo.images))
    assert "Config error:" in str(err.value)
    with pytest.raises(ConfigError, match="'validation_split' is 0.6; it must be at most 0.5"):
        image_config(demo.sd15, demo.images, tmp_path / "run", validation_split=0.6)


def test_too_few_samples_to_split_name_the_counts(demo, tmp_path):
    four = solid_colours(tmp_path / "four")
    with pytest.raises(StudioError, match="holds out none of the 4 images .* raise validation_split to 0.13"):
        loaded_engine(image_config(demo.sd15, four, tmp_path / "run", validation_split=0.1))
    one = chat_file(tmp_path / "one.jsonl", [("Hi?", "Hello.")])
    with pytest.raises(StudioError, match="hold out all of the 1 samples .* train on none"):
        loaded_engine(llm_config(demo, tmp_path / "run", train_data_dir=str(one), validation_split=0.5))


# --- Sample now / Save now -------------------------------------------------------------------------------------------

def test_save_and_sample_requests_are_answered_at_the_next_update(demo, tmp_path):
    requests = Requests()
    asks = {1: requests.sample, 2: requests.save}
    ask = lambda e: e.kind == "progress" and e.step in asks and asks[e.step].set()  # noqa: E731
    out = tmp_path / "run"
    train(image_config(demo.sd15, demo.images, out, max_train_steps=3, save_steps=0,
                       sample_prompts=["a red circle"], sample_inference_steps=2),
          EventSink([ask]), requests=requests)
    events = read_events(out / "events.jsonl")
    # Asked when update 1 is reported, which is once update 2 is queued (studio/run_reports.py): answered after
    # update 2; the end renders anyway. The save, asked at update 2's report, comes at once after it.
    assert [e.step for e in events if e.kind == "sample"] == [2, 3]
    assert [e.step for e in events if e.kind == "checkpoint"] == [2, 3]
    assert (out / f"{out.name}-step000002.safetensors").is_file()
    assert sorted(p.name for p in out.glob("*-step*.safetensors")) == [f"{out.name}-step000002.safetensors"]
    assert not requests.save.is_set() and not requests.sample.is_set()
