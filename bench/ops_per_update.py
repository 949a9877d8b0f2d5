"""Operations per update: the CPU proxy for a GPU's kernel launches (issue 24).

The studio trainer, bf16 autocast on the CPU, on four denoiser / LLM topologies at toy widths. torch.profiler counts
over updates 6-12: every aten op, the `aten::copy_` among them (dtype casts and layout conversions) and `aten::mm`.
On a GPU each of those ops is roughly one kernel launch, and an SD1.5 update is launch-bound (see
../shared/gpu-measurements/2026-12-04/), so fewer ops per update means a busier GPU. The profiler's `aten::copy_`
include copies CPU kernels make inside other ops (CPU addmm copies the bias into its output; a division by a Python
float casts the scalar); "copies dispatched" counts only the copies, clones and casts dispatched as ops of their own,
the ones a GPU runs as kernels, over the updates after the profiled ones (under a dispatch mode the profiler would
record each op twice); s/update is timed over the updates after those.

- SD1.5: the SD1.5 UNet's topology (4 levels, 2 layers per block, 16 transformer blocks) with every width / 10,
  64 px, batch 8.
- SDXL: SDXL's UNet topology (3 levels, 1/2/10 transformer layers per level) with every width / 10, 64 px, batch 8.
- Flux.1: Flux.1's 19 double-stream and 38 single-stream blocks at the demo's tiny widths, 64 px, batch 8.
- Llama: the demo's tiny Llama (2 layers), batch 8.

Run: `.venv/bin/python bench/ops_per_update.py [--write] [--only sd15]`.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench.results import update_results  # noqa: E402
from studio.compute_dtype_norms import norms_in_compute_dtype  # noqa: E402
from studio.config import config_from_dict  # noqa: E402
from studio.demo import ensure_demo  # noqa: E402
from studio.demo.datasets import build_demo_images  # noqa: E402
from studio.events import EventSink  # noqa: E402
from studio.families import get_family  # noqa: E402
from studio.fused_lora import fuse_lora_linears  # noqa: E402
from studio.loop import train  # noqa: E402
from studio.plan.autocast_trace import AutocastRules  # noqa: E402
from studio.tasks import TEXT_TASK  # noqa: E402

PROFILED = (6, 12)  # updates, inclusive
COUNTED = 3  # updates after the profiled ones whose dispatched copies are counted (a dispatch mode: the profiler
# would record each op twice under it)
TIMED = 8  # updates after those
CONFIGS = Path(__file__).resolve().parent.parent / "studio" / "models" / "configs"


def _unet_proxy(demo_model: Path, shipped: str, out: Path, **overrides) -> Path:
    """`demo_model`'s pipeline with its UNet replaced by the `shipped` UNet config at widths / 10."""
    from diffusers import UNet2DConditionModel

    shutil.copytree(demo_model, out)
    config = json.loads((CONFIGS / shipped / "unet" / "config.json").read_text(encoding="utf-8"))
    config["block_out_channels"] = [c // 10 for c in config["block_out_channels"]]
    config.update(sample_size=8, **overrides)
    torch.manual_seed(0)
    shutil.rmtree(out / "unet")
    UNet2DConditionModel.from_config(config).save_pretrained(out / "unet")
    return out


def _flux_proxy(demo_model: Path, out: Path) -> Path:
    from diffusers import FluxTransformer2DModel

    shutil.copytree(demo_model, out)
    config = json.loads((out / "transformer" / "config.json").read_text(encoding="utf-8"))
    shipped = json.loads((CONFIGS / "flux1-dev" / "transformer" / "config.json").read_text(encoding="utf-8"))
    config.update(num_layers=shipped["num_layers"], num_single_layers=shipped["num_single_layers"])
    torch.manual_seed(0)
    shutil.rmtree(out / "transformer")
    FluxTransformer2DModel.from_config(config).save_pretrained(out / "transformer")
    return out


def models(tmp: Path) -> dict[str, tuple[Path, Path, dict]]:
    """name → (model folder, data folder, config overrides)."""
    demo = ensure_demo(tmp / "ws")
    images = build_demo_images(tmp / "images")
    image = {"resolution": 64, "batch_size": 8, "enable_bucket": False}
    return {
        "sd15": (_unet_proxy(demo.sd15, "sd15", tmp / "sd15", cross_attention_dim=32), images, image),
        "sdxl": (_unet_proxy(demo.sdxl, "sdxl", tmp / "sdxl", attention_head_dim=[2, 4, 8], cross_attention_dim=64,
                             addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
                 images, image),
        "flux": (_flux_proxy(demo.flux, tmp / "flux"), images, image),
        "llama": (demo.llama, demo.chat, {"task_type": TEXT_TASK, "batch_size": 8, "max_length": 128}),
    }


class DispatchCounter(TorchDispatchMode):
    """Counts the `ops` a pass dispatches itself (not those a CPU kernel runs inside another op, like the bias copy
    in CPU addmm or the scalar casts of a Python number): on a GPU each is a kernel."""

    def __init__(self, ops: tuple = (torch.ops.aten._to_copy.default,)):
        super().__init__()
        self.ops, self.count = ops, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.ops
        return func(*args, **(kwargs or {}))


KERNEL_COPIES = (torch.ops.aten.copy_.default, torch.ops.aten.clone.default, torch.ops.aten._to_copy.default)


def count(model: Path, data: Path, overrides: dict, out: Path, profiled: tuple[int, int] = PROFILED,
          timed: int = TIMED) -> dict[str, float]:
    """aten ops, copies and matmuls per update over the `profiled` updates, the copies dispatched as ops of their
    own (`kernel_copies`) over the COUNTED after, and s/update over the `timed` after those."""
    first, last = profiled
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    kernel_copies = DispatchCounter(KERNEL_COPIES)
    marks: dict[int, float] = {}

    def on_progress(event) -> None:
        if event.kind != "progress":
            return
        step = event.step
        marks[step] = time.perf_counter()
        if step == first - 1:
            profiler.start()
        elif step == last:
            profiler.stop(), kernel_copies.__enter__()
        elif step == last + COUNTED:
            kernel_copies.__exit__(None, None, None)

    cfg = config_from_dict({"base_model": str(model), "train_data_dir": str(data), "output_dir": str(out),
                            "mixed_precision": "bf16", "device": "cpu", "save_steps": 0, "lora_rank": 8, **overrides,
                            "max_train_steps": last + COUNTED + timed})
    train(cfg, EventSink([on_progress]))
    names = [e.name for e in profiler.events() if e.name.startswith("aten::")]
    updates = last - first + 1
    seconds = [marks[s + 1] - marks[s] for s in range(last + COUNTED + 1, last + COUNTED + timed)]
    return {"ops": len(names) / updates, "copies": names.count("aten::copy_") / updates,
            "mm": names.count("aten::mm") / updates, "kernel_copies": kernel_copies.count / COUNTED,
            "s_per_update": statistics.median(seconds)}


def cuda_rule_casts(unet_dir: Path, batch: int = 8) -> list[int]:
    """Casts in one forward + backward of the trainer's LoRA UNet (bf16, fused LoRA layers) under CUDA autocast's
    rules, emulated on the CPU as the memory plan traces them (CPU autocast keeps norms 16-bit, so the trainer's CPU
    counts cannot show these): with autocast's fp32 norms, then with the trainer's compute-dtype norms."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(unet_dir).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=list(get_family("sd15").load_recipe().targets)))
    unet.to(torch.bfloat16)
    fuse_lora_linears([unet]), norms_in_compute_dtype([unet], torch.bfloat16)
    sample = torch.randn(batch, unet.config.in_channels, 8, 8, dtype=torch.bfloat16)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16)
    counts = []
    for fp32_norms in (True, False):
        with DispatchCounter() as casts:
            with AutocastRules(torch.bfloat16, fp32_norms):
                pred = unet(sample, torch.full((batch,), 500), text).sample
            torch.nn.functional.mse_loss(pred.float(), sample.float()).backward()
        counts.append(casts.count)
    return counts


def main(only: list[str]) -> str:
    tmp = Path(tempfile.mkdtemp())
    lines = [f"Trainer, bf16 autocast, LoRA rank 8 (default targets), on cpu, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; per update, profiled over updates {PROFILED[0]}-{PROFILED[1]}, "
             f"dispatched copies over the {COUNTED} after, s/update the median of the {TIMED - 1} after those.", "",
             "| model | aten ops | aten::copy_ | copies dispatched | aten::mm | s/update |",
             "|---|---|---|---|---|---|"]
    notes = [""]
    for name, (model, data, overrides) in models(tmp).items():
        if only and name not in only:
            continue
        r = count(model, data, overrides, tmp / f"run-{name}")
        lines.append(f"| {name} | {r['ops']:,.0f} | {r['copies']:,.0f} | {r['kernel_copies']:,.0f} | "
                     f"{r['mm']:,.0f} | {r['s_per_update'] * 1000:.0f} ms |")
        print(lines[-1], flush=True)
        if name == "sd15":
            fp32_norms, ours = cuda_rule_casts(model / "unet")
            notes.append("SD1.5 proxy under CUDA autocast's rules (emulated on the CPU as the memory plan traces them; "
                         f"CPU autocast keeps norms 16-bit, so the rows above cannot show this): {fp32_norms} casts "
                         f"per forward + backward with autocast's fp32 norms, {ours} with the trainer's norms in "
                         "the compute dtype (studio/compute_dtype_norms.py). Each is a copy kernel on a GPU.")
    shutil.rmtree(tmp, ignore_errors=True)
    return "\n".join(lines + notes)


if __name__ == "__main__":
    chosen = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else []
    report = main(chosen)
    print(report)
    if "--write" in sys.argv:
        update_results("ops_per_update", report)
