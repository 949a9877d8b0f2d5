"""bench/RESULTS.md holds the latest output of each benchmark, one `## name` section each."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nLatest output of each script in bench/ (`make bench` reruns them all).\n"


def update_results(name: str, report: str) -> None:
    """Replace (or add) the `## name` section of RESULTS.md with `report`."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else HEADER
    stamp = datetime.date.today().isoformat()
    section = f"## {name}\n\n_{stamp}, `python bench/{name}.py`_\n\n{report.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n", encoding="utf-8")
