"""Image training benchmark on the tiny SD1.5 model (CPU or GPU), all figures measured in one run.

1. Seconds per step of the studio trainer vs a minimal hand-written diffusers+peft loop doing the same work
   (same model, data, batch, cached latents and text embeddings). Target ratio <= 1.05.
2. Epoch time with and without latent caching, and the share of each epoch spent outside the UNet
   forward/backward + optimizer step (image decoding, resizing, VAE, text encoding). Target with caching:
   epochs >= 2 spend >= 95% of their time in the UNet step.

Run: `.venv/bin/python bench/image_train.py` (add --write to update bench/RESULTS.md).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDPMScheduler, StableDiffusionPipeline  # noqa: E402
from peft import LoraConfig  # noqa: E402

from bench.results import update_results  # noqa: E402
from studio.config import config_from_dict  # noqa: E402
from studio.data.images import load_pixels  # noqa: E402
from studio.demo import ensure_demo  # noqa: E402
from studio.demo.datasets import build_demo_images  # noqa: E402
from studio.engines.diffusion import DiffusionEngine  # noqa: E402
from studio.events import EventSink  # noqa: E402
from studio.loop import train  # noqa: E402

STEPS, WARMUP, BATCH, RANK = 60, 10, 4, 8


def trainer_seconds_per_step(model: Path, data: Path, out: Path) -> float:
    times = []
    cfg = config_from_dict({"base_model": str(model), "train_data_dir": str(data), "output_dir": str(out),
                            "resolution": 64, "batch_size": BATCH, "lora_rank": RANK, "max_train_steps": STEPS,
                            "save_steps": 0, "learning_rate": 1e-4, "enable_bucket": False, "max_grad_norm": 1.0})
    train(cfg, EventSink([lambda e: e.kind == "progress" and times.append(time.perf_counter())]))
    return (times[-1] - times[WARMUP - 1]) / (STEPS - WARMUP)


def reference_seconds_per_step(model: Path, data: Path) -> float:
    """The loop a diffusers user would write by hand, with the same caching the trainer does."""
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(model)
    unet, vae = pipe.unet, pipe.vae
    for m in (unet, vae, pipe.text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    images = sorted(data.glob("*.png"))
    with torch.no_grad():
        pixels = torch.stack([load_pixels(p, (64, 64))[0] for p in images])
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        embeds = pipe.encode_prompt(prompt=[p.stem for p in images], device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)[0]
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(STEPS):
        idx = torch.randperm(len(images), generator=gen)[:BATCH]
        x, c = latents[idx], embeds[idx]
        noise = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, 1000, (BATCH,), generator=gen)
        pred = unet(scheduler.add_noise(x, noise, t), t, c).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return (times[-1] - times[WARMUP - 1]) / (STEPS - WARMUP)


def trainer_vs_reference(reference: Callable[[Path, Path], float], model: Path, data: Path, tmp: Path,
                         reference_name: str) -> list[str]:
    """The trainer's s/step against `reference`'s on the same model and data, as a markdown table and ratio."""
    ours, refs = [], []
    for i in range(4):  # interleaved, order alternating (ABBA): whichever runs first in a pair is slower
        pair = [lambda: refs.append(reference(model, data)),
                lambda: ours.append(trainer_seconds_per_step(model, data, tmp / f"run{i}"))]
        for run in (pair if i % 2 == 0 else pair[::-1]):
            run()
    ref, mine = statistics.median(refs), statistics.median(ours)
    return ["| loop | s/step (median of 4, order alternating) |", "|---|---|",
            f"| {reference_name} | {ref * 1000:.1f} ms |", f"| studio trainer | {mine * 1000:.1f} ms |",
            "", f"**trainer / reference = {mine / ref:.3f}** (target <= 1.05)"]


def epoch_profile(model: Path, data: Path, out: Path, cache: bool) -> list[tuple[float, float]]:
    """(epoch seconds, share outside the UNet step) per epoch; 'outside' = building batches (DiffusionEngine.collate)."""
    outside = [0.0]
    original = DiffusionEngine.collate

    def timed_collate(self, indices, epoch):
        start = time.perf_counter()
        try:
            return original(self, indices, epoch)
        finally:
            outside[0] += time.perf_counter() - start

    marks: list[tuple[int, float, float]] = []  # (epoch, time, outside so far) at each step
    DiffusionEngine.collate = timed_collate
    try:
        cfg = config_from_dict({"base_model": str(model), "train_data_dir": str(data), "output_dir": str(out),
                                "resolution": 64, "batch_size": BATCH, "lora_rank": RANK, "epochs": 4,
                                "save_steps": 0, "cache_latents": cache, "enable_bucket": False})
        start = [0.0]
        train(cfg, EventSink([lambda e: e.kind == "start" and start.__setitem__(0, time.perf_counter()),
                              lambda e: e.kind == "progress" and marks.append(
                                  (e.data["epoch"], time.perf_counter(), outside[0]))]))
    finally:
        DiffusionEngine.collate = original
    epochs, previous = [], (start[0], 0.0)
    for epoch in sorted({m[0] for m in marks}):
        last = [m for m in marks if m[0] == epoch][-1]
        seconds, spent_outside = last[1] - previous[0], last[2] - previous[1]
        epochs.append((seconds, spent_outside / seconds))
        previous = (last[1], last[2])
    return epochs


def main() -> str:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tmp = Path(tempfile.mkdtemp())
    demo = ensure_demo(tmp / "ws")
    data = tmp / "data"
    build_demo_images(data)  # 8 images; sized 96-128 px, so uncached epochs really decode and resize
    lines = [f"Tiny SD1.5 (64 px, batch {BATCH}, rank {RANK}) on {torch.device('cuda' if torch.cuda.is_available() else 'cpu')}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads.", ""]

    lines += trainer_vs_reference(reference_seconds_per_step, demo.sd15, data, tmp, "hand-written diffusers+peft")
    lines.append("")

    lines += ["| latent caching | epoch | epoch time | outside UNet step |", "|---|---|---|---|"]
    for cache in (False, True):
        for n, (seconds, share) in enumerate(epoch_profile(demo.sd15, data, tmp / f"prof{cache}", cache), 1):
            lines.append(f"| {'on' if cache else 'off'} | {n} | {seconds * 1000:.0f} ms | {share * 100:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    report = main()
    print(report)
    if "--write" in sys.argv:
        update_results("image_train", report)
