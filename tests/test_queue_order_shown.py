"""The Runs table shows each queued job's turn, and moving one says where it is now."""

from studio.ui.context import Studio
from studio.ui.runs_table import move_queued, runs_frame
from studio.workspace import Workspace


def test_moving_a_queued_job_shows_its_new_turn(tmp_path):
    studio = Studio(Workspace(tmp_path).ensure())
    for name in ("a", "b", "c"):
        studio.index.enqueue(name, "preset: demo-image\n")
    message = move_queued(studio, "c", -1)
    assert "Moved 'c' earlier in the queue: now #2 of 3" in message, message
    status = dict(zip(runs_frame(studio)["run"], runs_frame(studio)["status"]))
    assert status == {"a": "queued #1", "c": "queued #2", "b": "queued #3"}, status
