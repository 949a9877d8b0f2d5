"""Auto-labelling throughput on the tiny models of every mode (CLIP, BLIP, WD14 tagger, VLM): images/s, batch 1 vs 8.

Measures `auto_label` end to end after the models are loaded (decode, preprocess, forward, caption composition);
model loading is reported separately. The tiny models make this a measure of the pipeline's own overhead and of what
batching saves, not of real model speed. The random VLM never stops early, so its captions are VLM_TOKENS long.

Run: `.venv/bin/python bench/auto_label.py` (add --write to update bench/RESULTS.md; --modes wd14,vlm measures only
those modes). On a machine busy with other work, set OMP_NUM_THREADS=1: torch's threads wait on each other at every
op when the cores are taken, and rates then swing tenfold from run to run.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local models only: never wait on a hub lookup
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.results import update_results  # noqa: E402
from studio.data.captioning import MODES, LabelModels, auto_label  # noqa: E402
from studio.demo.captioners import build_tiny_blip, build_tiny_clip, build_tiny_vlm, build_tiny_wd14  # noqa: E402
from studio.demo.datasets import COLOURS, SHAPES, draw_shape  # noqa: E402

IMAGES, SIDE, REPEATS, BATCHES = 32, 256, 5, (1, 8)
VLM_TOKENS = 30  # about one sentence


def make_images(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(IMAGES):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
        draw_shape(shape, colour, (SIDE, SIDE)).save(folder / f"{i:03d}_{colour}_{shape}.png")
    return folder


def measure(folder: Path, models: LabelModels, mode: str) -> dict[int, tuple[float, float]]:
    """Batch size → (images/s, seconds of set-up before the first image: loading models, embedding the vocabulary),
    medians. The batch sizes alternate run by run, so a machine busy with other work slows them alike."""
    samples = {batch: [] for batch in BATCHES}
    for _ in range(REPEATS):
        for batch in BATCHES:
            samples[batch].append(run_once(folder, models, mode, batch))
    return {batch: tuple(map(statistics.median, zip(*runs))) for batch, runs in samples.items()}


def run_once(folder: Path, models: LabelModels, mode: str, batch_size: int) -> tuple[float, float]:
    begin, started = time.perf_counter(), []

    def progress(done: int, total: int, images_per_s: float) -> None:
        if done == 0:  # auto_label reports 0 done once its models are ready
            started.append(time.perf_counter())

    report = auto_label(folder, mode=mode, batch_size=batch_size, overwrite=True, models=models, progress=progress)
    return report.images_per_s, started[0] - begin


def tiny_models(tmp: Path) -> LabelModels:
    return LabelModels(clip_model=str(build_tiny_clip(tmp / "clip")), blip_model=str(build_tiny_blip(tmp / "blip")),
                       wd14_model=str(build_tiny_wd14(tmp / "wd14")), vlm_model=str(build_tiny_vlm(tmp / "vlm")),
                       vlm_max_tokens=VLM_TOKENS)


def main(modes: list[str]) -> str:
    tmp = Path(tempfile.mkdtemp())
    models = tiny_models(tmp)
    folder = make_images(tmp / "images")
    for mode in modes:  # warm-up: imports, caches, first-call kernels
        auto_label(folder, mode=mode, batch_size=8, overwrite=True, models=models)
    lines = [f"{IMAGES} PNGs of {SIDE}x{SIDE} px; tiny CLIP, BLIP and LLaVA-style VLM (32 px input; VLM captions "
             f"{VLM_TOKENS} tokens) and a tiny ONNX WD14 tagger (32 px input, onnxruntime); on "
             f"{'cuda' if torch.cuda.is_available() else 'cpu'}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; median of {REPEATS} runs (batch sizes alternating), set-up excluded "
             "from img/s.", "",
             "| mode | batch 1 | batch 8 | batch 8 / batch 1 | set-up (load models, embed vocabulary) |",
             "|---|---|---|---|---|"]
    for mode in modes:
        (single, setup), (batched, _) = measure(folder, models, mode).values()
        lines.append(f"| {mode} ({MODES[mode].title}) | {single:.1f} img/s | {batched:.1f} img/s | "
                     f"{batched / single:.2f}x | {setup * 1000:.0f} ms |")
    return "\n".join(lines)


if __name__ == "__main__":
    chosen = sys.argv[sys.argv.index("--modes") + 1].split(",") if "--modes" in sys.argv else list(MODES)
    report = main(chosen)
    print(report)
    if "--write" in sys.argv:
        update_results("auto_label", report)
