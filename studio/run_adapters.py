"""Every adapter a run exported, so a user can pick the step that looks best: one per saved step
(`<name>-step000400.safetensors`, LLMs: a folder `<name>-step000400/`; see `save_adapter_every`) and the final one."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LORA_SUFFIX = ".safetensors"
PEFT_CONFIG = "adapter_config.json"  # what makes a folder an LLM adapter
STEP_ADAPTER = re.compile(r"[^.].*-step(\d{6,})(\.safetensors)?")  # not hidden: a temporary file or folder is


@dataclass(frozen=True)
class RunAdapter:
    path: Path
    step: int | None = None  # None: the final adapter

    @property
    def label(self) -> str:
        return "final" if self.step is None else f"step {self.step}"


def step_of(path: Path) -> int | None:
    """The step a step adapter was saved at; None for any other name (the final adapter)."""
    match = STEP_ADAPTER.fullmatch(path.name)
    return int(match[1]) if match else None


def run_adapters(folder: Path, final: Path | None) -> list[RunAdapter]:
    """The run's step adapters, oldest first, then its final adapter (when it has one): newest last."""
    steps, final_name = [], final.name if final is not None else None
    for entry in folder.iterdir() if folder.is_dir() else ():
        step = step_of(entry)
        if step is not None and entry.name != final_name and _is_adapter(entry):
            steps.append(RunAdapter(entry, step))
    steps.sort(key=lambda a: (a.step, a.path.name))
    return steps + ([RunAdapter(final)] if final is not None else [])


def _is_adapter(path: Path) -> bool:
    """An image LoRA file or an LLM adapter folder."""
    return path.suffix == LORA_SUFFIX and path.is_file() or (path / PEFT_CONFIG).is_file()


def evenly_spaced(adapters: list[RunAdapter], count: int) -> list[RunAdapter]:
    """At most `count` of the adapters, spread evenly from the oldest to the newest (both kept)."""
    if len(adapters) <= count:
        return list(adapters)
    if count == 1:
        return adapters[-1:]
    picks = dict.fromkeys(round(i * (len(adapters) - 1) / (count - 1)) for i in range(count))
    return [adapters[i] for i in picks]
