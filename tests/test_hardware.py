import pytest
import torch

from studio.errors import StudioError
from studio.hardware import auto_precision, autocast_dtype, detect, pick_device, storage_dtype


def test_auto_precision():
    assert auto_precision("cuda", True)[0] == "bf16"
    assert auto_precision("cuda", False)[0] == "fp16"  # older cards: fp16 with loss scaling
    assert auto_precision("cpu", True)[0] == "no"
    assert auto_precision("mps", False)[0] == "no"


def test_frozen_weights_are_16_bit_only_on_gpus():
    assert storage_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert storage_dtype(torch.bfloat16, "cpu") == torch.bfloat16  # no per-call weight cast under CPU autocast
    assert storage_dtype(None, "cpu") == torch.float32
    assert storage_dtype(None, "cuda") == torch.float32


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
    assert autocast_dtype("auto", cpu) is None  # the CPU trains in fp32
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(StudioError, match="fp16 is not supported on the CPU"):
        autocast_dtype("fp16", cpu)
