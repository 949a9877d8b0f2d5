"""The library fast paths a run takes: fused AdamW, SDPA attention, backend settings, torch.compile."""

import pytest
import torch
from safetensors.torch import load_file

from studio.config import config_from_dict
from studio.engines import make_engine
from studio.events import EventSink
from studio.hardware import configure_backends, to_device
from studio.loop import train
from studio.optim import build_optimizer

CPU = torch.device("cpu")


def test_adamw_is_fused(demo, tmp_path):
    cfg = config_from_dict({"base_model": str(demo.sd15), "train_data_dir": str(demo.images),
                            "output_dir": str(tmp_path)})
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = build_optimizer(cfg, [{"params": [weight], "lr": 0.1}], CPU)
    weight.grad = torch.ones(3)
    optimizer.step()
    assert optimizer.param_groups[0]["fused"] is True and weight.detach().lt(1).all()


def test_cpu_backends_are_left_alone_and_batches_move_plainly():
    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    configure_backends(CPU)
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before
    moved = to_device(torch.arange(3), CPU, torch.float16)
    assert moved.dtype == torch.float16 and not moved.is_pinned()
    assert to_device(torch.arange(3), CPU).dtype == torch.int64


def test_unet_attention_is_sdpa_and_logged(demo, tmp_path):
    logs = []
    cfg = config_from_dict({"preset": "demo-image", "base_model": str(demo.sd15), "train_data_dir": str(demo.images),
                            "output_dir": str(tmp_path)})
    engine = make_engine(cfg, CPU, None, EventSink([lambda e: e.kind == "log" and logs.append(e.message)]))
    engine.load()
    assert "Attention: AttnProcessor2_0 (PyTorch SDPA)." in logs


@pytest.mark.slow  # ~30 s of inductor compiling on 2 CPU cores with a cold cache (~6 s warm)
def test_torch_compile_trains_and_exports_the_same_keys(demo, tmp_path):
    def adapter_keys(**extra):
        cfg = config_from_dict({"preset": "demo-llm", "base_model": str(demo.llama), "train_data_dir": str(demo.chat),
                                "output_dir": str(tmp_path / str(extra)), "max_train_steps": 1, "save_steps": 0,
                                "sample_every_steps": 0, "sample_prompts": [], **extra})
        result = train(cfg)
        return sorted(load_file(str(result.files[0] / "adapter_model.safetensors")))

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = adapter_keys(torch_compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile
    assert compiled == adapter_keys()
