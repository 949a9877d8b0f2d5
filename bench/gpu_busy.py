"""How busy the GPU is while the trainer runs (issue 24): torch.profiler over the last PROFILED updates of a run.

The busy share is the time covered by CUDA kernels (overlapping kernels counted once) over the wall time of those
updates: a launch-bound step leaves the GPU idle between kernels (42 % busy for SD1.5 batch 8 on an H200 before
issue 24). Kernels and `aten::copy_` per update come from the same trace. Profiling slows the host, so these updates
stay out of the speed and MFU (gpu_runs.py times the updates before them). Without CUDA (the dry run) there are no
kernels and the figures are None.
"""

from __future__ import annotations

import time

PROFILED = 3  # the last updates of a run


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


class BusyProfile:
    """Started at the end of update `total - PROFILED`, stopped at the end of the last one."""

    def __init__(self, total_updates: int):
        self.first, self.last = total_updates - PROFILED, total_updates
        self.profiler = self.started = None
        self.figures: dict[str, float | None] = {}

    def on_update(self, update: int) -> None:
        """After update number `update` (1-based) ended."""
        import torch

        if update == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
            self.started = time.perf_counter()
        elif update == self.last and self.profiler is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the last update's kernels are inside the window
            wall = time.perf_counter() - self.started
            self.profiler.stop()
            self.figures = self._figures(self.profiler.events(), wall)

    def close(self) -> None:
        """After the run: a profiler still running (the run ended early) stops, its trace unused."""
        if self.profiler is not None and not self.figures:
            self.profiler.stop()
        self.profiler = None

    def _figures(self, events, wall: float) -> dict[str, float | None]:
        from torch.autograd import DeviceType

        kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
        copies = sum(1 for e in events if e.name == "aten::copy_" and e.device_type == DeviceType.CPU)
        if not kernels:
            return {"gpu_busy": None, "kernels_per_update": None, "copies_per_update": copies / PROFILED}
        return {"gpu_busy": min(1.0, busy_seconds(kernels) / 1e6 / wall),  # profiler times are in µs
                "kernels_per_update": len(kernels) / PROFILED, "copies_per_update": copies / PROFILED}
