"""The memory plan as data: rows, peak, verdict and its text forms. No torch here: the UI imports it."""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 2**30
FITS, TIGHT = 0.92, 1.0  # share of the card a plan may use: the rest is allocator fragmentation


@dataclass
class PlanRow:
    name: str
    gb: float
    note: str = ""
    formula: str = ""  # how the figure is computed (`--plan --verbose`)


@dataclass
class MemoryPlan:
    rows: list[PlanRow]
    card_gb: float | None  # None: no GPU, the run uses system RAM
    source: str  # where the model sizes came from
    flops_per_sample: int | None = None
    # Image runs on a GPU: each phase's allocated GB (studio/plan/phases.py); `rows` are the train phase's
    phases: list[PlanRow] = field(default_factory=list)

    @property
    def peak_gb(self) -> float:
        return self.allocated_gb + sum(row.gb for row in self.rows if row.name == CONTEXT_ROW)

    @property
    def allocated_gb(self) -> float:
        """The part torch's allocator sees (`torch.cuda.max_memory_allocated`): all but the CUDA context; with
        phases, the highest phase's."""
        if self.phases:
            return max(row.gb for row in self.phases)
        return sum(row.gb for row in self.rows if row.name != CONTEXT_ROW)

    @property
    def peak_phase(self) -> str | None:
        return max(self.phases, key=lambda row: row.gb).name if self.phases else None

    @property
    def fits(self) -> bool:
        return self.card_gb is None or self.peak_gb <= FITS * self.card_gb

    @property
    def verdict(self) -> str:
        if self.card_gb is None:
            return "cpu"
        if self.fits:
            return "fits"
        return "tight" if self.peak_gb <= TIGHT * self.card_gb else "too big"

    def summary(self) -> str:
        if self.card_gb is None:
            return f"Planned peak {gb_text(self.peak_gb)} of system RAM (no GPU)."
        words = {"fits": "fits", "tight": "is tight on", "too big": "does not fit"}
        return (f"Planned peak {gb_text(self.peak_gb)} {words[self.verdict]} the {self.card_gb:g} GB card "
                f"({100 * self.peak_gb / self.card_gb:.0f} %).")

    def table(self) -> str:
        """The plan as aligned text lines (the CLI's --plan)."""
        width = max(len(row.name) for row in self.rows)
        lines = [f"  {row.name:<{width}}  {gb_text(row.gb):>9}  {row.note}".rstrip() for row in self.rows]
        if self.phases:
            lines.append("  phases (allocated; the highest is the peak, with the CUDA context):")
            lines += [f"  {'· ' + row.name:<{width}}  {gb_text(row.gb):>9}  {row.note}" for row in self.phases]
        lines.append(f"  {'peak':<{width}}  {gb_text(self.peak_gb):>9}  {self.summary()}")
        return "\n".join(lines)


CONTEXT_ROW = "CUDA context"


def gb_text(gb: float) -> str:
    return f"{gb:.2f} GB" if gb >= 0.995 else f"{gb * 1024:.0f} MB"


def count_text(n: int) -> str:
    """A parameter count as people say it: 2.57 B, 860 M, 98 k."""
    for scale, unit, digits in ((1e9, "B", 2), (1e6, "M", 0), (1e3, "k", 0)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return str(n)
