"""The GPU bench's parts (--only): for each model, build it and its data once, then run its cases; the 8B model
also serves the longest-context search. A part's failure is recorded in its rows, never raised."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from gpu_cases import IMAGE_PARTS, MODEL_NAMES, Case, case_row, plan_cases
from gpu_context import run_context
from gpu_device import GB
from gpu_log import error_text, say
from gpu_models import build_image_model, build_llm_model, chat_conversations, make_chat_data, make_image_data
from gpu_runs import run_case
from gpu_session import Session


def run_image_part(session: Session, family: str) -> None:
    """Build the family's model and data once, then run each planned case."""
    say(f"== {MODEL_NAMES[family]}")
    cases = _planned(session, family)
    if cases is None:
        return
    try:
        session.gpu.set_card(None)  # building needs the whole device
        built = time.perf_counter()
        model = build_image_model(session.setup.image_configs[family], session.work / "models" / family, session.gpu)
        resolution = session.setup.resolution or max(c.fitted.cfg.resolution for c in cases)
        data = make_image_data(session.work / "data" / f"{family}-{resolution}", resolution)
        say(f"   model and data ready ({time.perf_counter() - built:.0f} s)")
    except Exception as exc:  # noqa: BLE001
        _record_build_failure(session, cases, exc)
        return
    for case in cases:
        session.record(run_case(session, case, model, data))


def run_llm_parts(session: Session, parts: list[str]) -> None:
    """The 8B model's cases ("llm") and its longest-context search ("llm-ctx"), on one build of the model."""
    say("== Llama 3.1 8B")
    cases = (_planned(session, "llm") or []) if "llm" in parts else []
    try:
        session.gpu.set_card(None)
        _make_room(session.work, need_gb=20)
        built = time.perf_counter()
        chats = chat_conversations()
        data = make_chat_data(session.work / "data" / "chat", chats)
        model = build_llm_model(session.setup.llm_config, session.work / "models" / "llm", chats, session.gpu)
        say(f"   model and data ready ({time.perf_counter() - built:.0f} s)")
    except Exception as exc:  # noqa: BLE001
        _record_build_failure(session, cases, exc)
        if "llm-ctx" in parts:
            session.record({"id": "llm-ctx", "kind": "context", "status": f"error: building the model: "
                                                                          f"{error_text(exc)}"})
        return
    for case in cases:
        session.record(run_case(session, case, model, data))
    if "llm-ctx" in parts:
        session.record(run_context(session, model, data))


def _planned(session: Session, family: str) -> list[Case] | None:
    """The family's cases, or None when the planner fails (recorded as the part's error)."""
    try:
        return plan_cases([family])
    except Exception as exc:  # noqa: BLE001
        session.record({"id": f"{family}/planner", "kind": "error", "status": f"error: planning: {error_text(exc)}"})
        return None


def _record_build_failure(session: Session, cases: list[Case], exc: Exception) -> None:
    """Every case that would have run ends with the build's error; the others keep their own status."""
    for case in cases:
        row = case_row(case)
        if row["status"] == "pending":
            row["status"] = f"error: building the model: {error_text(exc)}"
        session.record(row)


def _make_room(work: Path, need_gb: float) -> None:
    """Remove the image models (rebuilt in a minute when needed) if the disk has less than `need_gb` free."""
    if shutil.disk_usage(work).free / GB < need_gb:
        for family in IMAGE_PARTS:
            shutil.rmtree(work / "models" / family, ignore_errors=True)
