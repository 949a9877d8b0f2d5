import pytest
import torch

from studio.hardware import TIERS, autocast_dtype, detect, pick_device, recommend
from studio.errors import StudioError

# The table documented in README.md ("VRAM heuristics"); a change here must change the README too.
EXPECTED = {
    # family, GB: (batch, accumulation, resolution / max_length, rank, checkpointing, precision, 4-bit)
    ("sd15", 48): (4, 1, 512, 8, False, "bf16", None),
    ("sd15", 24): (4, 1, 512, 8, False, "bf16", None),
    ("sd15", 16): (4, 1, 512, 8, False, "bf16", None),
    ("sd15", 12): (2, 2, 512, 8, False, "bf16", None),
    ("sd15", 8): (1, 4, 512, 8, True, "bf16", None),
    ("sd15", None): (1, 1, 256, 8, False, "no", None),
    ("sdxl", 48): (4, 1, 1024, 8, False, "bf16", None),
    ("sdxl", 24): (2, 2, 1024, 8, True, "bf16", None),
    ("sdxl", 16): (1, 4, 1024, 8, True, "bf16", None),
    ("sdxl", 12): (1, 4, 768, 8, True, "bf16", None),
    ("sdxl", 8): (1, 4, 640, 8, True, "bf16", None),
    ("sdxl", None): (1, 1, 512, 8, False, "no", None),
    ("llm", 48): (4, 1, 2048, 8, False, "bf16", False),
    ("llm", 24): (2, 2, 2048, 8, True, "bf16", False),
    ("llm", 16): (2, 2, 2048, 8, True, "bf16", True),
    ("llm", 12): (1, 4, 1024, 8, True, "bf16", True),
    ("llm", 8): (1, 4, 512, 8, True, "bf16", True),
    ("llm", None): (1, 1, 512, 8, False, "no", False),
}


@pytest.mark.parametrize("family,gb", list(EXPECTED))
def test_heuristics_table(family, gb):
    v = recommend(family, gb).values
    length = v.get("max_length", v.get("resolution"))
    got = (v["batch_size"], v["gradient_accumulation_steps"], length, v["lora_rank"], v["gradient_checkpointing"],
           v["mixed_precision"], v.get("load_in_4bit"))
    assert got == EXPECTED[(family, gb)]


def test_every_value_has_a_reason():
    rec = recommend("sdxl", 12)
    assert set(rec.values) == set(rec.reasons) and all(rec.reasons.values())
    assert "lowered from 4" in rec.reasons["batch_size"]


def test_rank_is_capped_only_when_memory_is_short():
    assert recommend("sd15", 24, start={"lora_rank": 32}).values["lora_rank"] == 32
    assert recommend("sd15", 4, start={"lora_rank": 32}).values["lora_rank"] == 8
    assert all(t.max_rank <= 64 for tiers in TIERS.values() for t in tiers)


def test_memory_monotonic():
    """More memory never gives a smaller batch or resolution."""
    for family in TIERS:
        previous = None
        for gb in (4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 80):
            v = recommend(family, gb).values
            now = (v["batch_size"], v.get("resolution", v.get("max_length")))
            if previous:
                assert now >= previous, (family, gb)
            previous = now


def test_small_llm_needs_no_4bit():
    assert recommend("llm", 8, llm_billions=1.0).values["load_in_4bit"] is False
    assert recommend("llm", 8, llm_billions=7.0).values["load_in_4bit"] is True


def test_fp16_when_card_has_no_bf16():
    assert recommend("sd15", 8, bf16=False).values["mixed_precision"] == "fp16"


def test_detect_and_device_on_this_machine():
    hw = detect()
    assert hw.device in {"cpu", "cuda", "mps"} and hw.summary()
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(StudioError, match="no CUDA GPU"):
            pick_device("cuda")


def test_autocast_dtype():
    cpu = torch.device("cpu")
    assert autocast_dtype("no", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(StudioError, match="fp16 is not supported on the CPU"):
        autocast_dtype("fp16", cpu)
