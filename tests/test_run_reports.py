"""Progress one update late (studio/run_reports.py): an update's loss is read on the host once the next update is
queued, so a GPU is never left waiting for the host; before anything else happens, at once."""

import pytest

from studio.config import config_from_dict
from studio.engines.llm import LLMEngine
from studio.events import EventSink
from studio.loop import train


def test_each_update_is_reported_once_the_next_is_queued(demo, tmp_path, monkeypatch):
    losses_run = []
    loss = LLMEngine.loss
    monkeypatch.setattr(LLMEngine, "loss", lambda self, batch, rng: losses_run.append(1) or loss(self, batch, rng))
    reported = []
    cfg = config_from_dict({"preset": "demo-llm", "base_model": str(demo.llama), "train_data_dir": str(demo.chat),
                            "output_dir": str(tmp_path / "run"), "batch_size": 1, "max_train_steps": 6,
                            "save_steps": 3, "sample_every_steps": 0, "sample_prompts": []})
    result = train(cfg, EventSink([lambda e: e.kind == "progress" and reported.append((e.step, len(losses_run))),
                                   lambda e: e.kind == "checkpoint" and reported.append(("checkpoint", e.step))]))
    # (step, updates run when it was reported): one late, except before the checkpoint and at the end
    assert reported == [(1, 2), (2, 3), (3, 3), ("checkpoint", 3), (4, 5), (5, 6), (6, 6), ("checkpoint", 6)]
    assert result.last_loss == result.last_loss and result.step == 6



def test_a_failing_run_still_reports_the_updates_it_finished(demo, tmp_path, monkeypatch):
    losses_run = []
    loss = LLMEngine.loss

    def third_fails(self, batch, rng):
        losses_run.append(1)
        if len(losses_run) == 3:
            raise RuntimeError("broken batch")
        return loss(self, batch, rng)

    monkeypatch.setattr(LLMEngine, "loss", third_fails)
    events = []
    cfg = config_from_dict({"preset": "demo-llm", "base_model": str(demo.llama), "train_data_dir": str(demo.chat),
                            "output_dir": str(tmp_path / "run"), "batch_size": 1, "max_train_steps": 6,
                            "save_steps": 0, "sample_every_steps": 0, "sample_prompts": []})
    with pytest.raises(RuntimeError, match="broken batch"):
        train(cfg, EventSink([lambda e: e.kind in ("progress", "failed") and events.append((e.kind, e.step))]))
    assert events[:-1] == [("progress", 1), ("progress", 2)] and events[-1][0] == "failed"
