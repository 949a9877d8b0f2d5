"""The fit for the reference models on the usual cards: README's VRAM table and the GPU bench's runs come from here.

The reference models are the shipped configs (no weights, studio/models/configs): each registered image family
(SD1.5, SDXL, Flux.1 dev) with the style preset, Llama 3.1 8B with the llm-chat preset.

    python -m studio.plan.reference        # prints the markdown table README.md holds
"""

from __future__ import annotations

from pathlib import Path

from studio.families import all_families
from studio.hardware import Hardware
from studio.plan.fit import Fitted, fit_config
from studio.plan.models import LLM_REFERENCE
from studio.tasks import IMAGE_TASK

REFERENCES = {  # name → (base_model, preset)
    **{family.label: (family.config_path, "style") for family in all_families(IMAGE_TASK)},
    "Llama 3.1 8B": (LLM_REFERENCE, "llm-chat"),
}
CARDS_GB = (24, 16, 12, 8)
# A bf16-capable CUDA card of the planned size (the size itself comes from vram_budget_gb).
PLANNING_GPU = Hardware("cuda", "planned card", None, None, True)


def fit_reference(name: str, card_gb: float, **keys) -> Fitted:
    """The fitted config of reference model `name` on a `card_gb` card; `keys` are the user's own keys."""
    base_model, preset = REFERENCES[name]
    data = {"preset": preset, "base_model": str(base_model), "train_data_dir": str(Path.cwd()),
            "output_dir": str(Path.cwd() / "plan"), "vram_budget_gb": card_gb, **keys}
    return fit_config(data, PLANNING_GPU, check_paths=False)


def vram_table() -> str:
    lines = ["| model | card | micro-batch × accumulation | resolution / max_length | grad. checkpointing | "
             "weights | blocks swapped | optimizer | planned peak (phase) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in REFERENCES:
        for card in CARDS_GB:
            fitted = fit_reference(name, card)
            c, plan = fitted.cfg, fitted.plan
            length = c.resolution if c.is_image else c.max_length
            weights = ("4-bit NF4" if c.load_in_4bit else f"fp8 + {c.mixed_precision}" if c.fp8_base
                       else c.mixed_precision)
            peak = f"{plan.peak_gb:.1f} GB" + (f" ({plan.peak_phase})" if plan.peak_phase else "") + (
                "" if plan.fits else f", {plan.verdict}")
            swapped = f"{c.blocks_to_swap}" if c.is_image else "–"
            lines.append(f"| {name} | {card} GB | {c.batch_size} × {c.gradient_accumulation_steps} | {length} | "
                         f"{'on' if c.gradient_checkpointing else 'off'} | {weights} | {swapped} | {c.optimizer} | "
                         f"{peak} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(vram_table())
