"""The plan and the measured memory of a running job: the `plan` event at start, peak GPU memory as it goes."""

from __future__ import annotations

import torch

from studio.config import RunConfig
from studio.errors import StudioError
from studio.events import EventSink
from studio.hardware import detect
from studio.plan.fit import Fitted, card_memory
from studio.plan.memory import plan_memory
from studio.plan.report import MemoryPlan
from studio.plan.speed import run_signature
from studio.families import resolve_family


def report_plan(cfg: RunConfig, fitted: Fitted | None, events: EventSink) -> MemoryPlan | None:
    """Emit the fit's reasons and the memory plan (a `plan` event the CLI prints and the Train tab logs)."""
    hardware = detect()
    family = fitted.family if fitted else resolve_family(cfg).name
    try:
        plan = fitted.plan if fitted else plan_memory(cfg, family, card_memory(cfg, hardware))
    except (StudioError, OSError, ValueError) as exc:  # a model the planner cannot size still trains
        events.emit("log", message=f"No memory plan for this model ({exc}); training without one.")
        return None
    message = fitted.report() if fitted else f"Memory plan ({plan.source}):\n{plan.table()}"
    events.emit("plan", message=message, family=family, device=hardware.name, planned_peak_gb=plan.peak_gb,
                signature=run_signature(cfg, family, hardware.name),
                effective_batch=cfg.effective_batch,
                planned_allocated_gb=plan.allocated_gb, reasons=fitted.reasons if fitted else {},
                rows=[[row.name, row.gb, row.note] for row in plan.rows])
    return plan


def peak_memory(device: torch.device) -> dict[str, float]:
    """Measured peak GPU memory so far (GB): what torch allocated, and what its allocator reserved."""
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}


def measure_peak(device: torch.device, plan: MemoryPlan | None, events: EventSink) -> dict[str, str]:
    """Log the measured peak next to the planned one; the adapter header gets both."""
    measured = peak_memory(device)
    header = {"studio_planned_peak_gb": f"{plan.allocated_gb:.2f}"} if plan else {}
    if not measured:
        return header
    planned = f", planned {plan.allocated_gb:.2f} GB" if plan else ""
    events.emit("log", message=f"Peak GPU memory: {measured['peak_allocated_gb']:.2f} GB allocated "
                               f"({measured['peak_reserved_gb']:.2f} GB reserved){planned}.", **measured)
    return {**header, "studio_peak_vram_gb": f"{measured['peak_allocated_gb']:.2f}",
            "studio_peak_reserved_gb": f"{measured['peak_reserved_gb']:.2f}"}
