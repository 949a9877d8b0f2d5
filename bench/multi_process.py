"""Data-parallel scaling: samples/s of 2 training processes vs 1, on the tiny SD1.5 and the tiny Llama, in one run.

Both go through `python train.py --config X --num-processes N` (N=1 trains in that process, N=2 relaunches through
accelerate: gloo on the CPU, nccl on 2+ CUDA GPUs), with the same batch_size per process, so 2 processes do twice the
samples per update (weak scaling, as more GPUs are used). Samples/s comes from the progress events' timestamps in
output_dir/events.jsonl, after the first WARMUP updates (start-up, loading and warm-up are not counted); each setting
runs twice, in alternating order, and the faster run counts (the least disturbed by other work). Each of 2
processes runs one thread (torchrun sets OMP_NUM_THREADS=1), so 1 process is measured twice: on one thread (the same
per-process resources: the ratio is the scaling efficiency, 2.0 ideal) and on torch's default threads (all cores: what
a second process buys on the same CPU). On a CPU these say little about GPUs; the load average is recorded because
other work on the machine skews them (tiny models on a busy CPU lose most to a second thread's contention).

Run: `.venv/bin/python bench/multi_process.py` (add --write to update bench/RESULTS.md).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local models only: never wait on a hub lookup
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.results import update_results  # noqa: E402
from studio.demo import ensure_demo  # noqa: E402
from studio.events import read_events  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WARMUP = 5
CASES = {  # name: (preset, model, dataset, per-process batch, updates)
    "tiny SD1.5 (64 px, rank 4)": ("demo-image", "sd15", "images", 2, 25),
    "tiny Llama (64 tokens, rank 8)": ("demo-llm", "llama", "chat", 3, 100),
}


def samples_per_s(demo, case: tuple, processes: int, out: Path, threads: int | None = None) -> float:
    preset, model, data, batch, updates = case
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump({"preset": preset, "base_model": str(getattr(demo, model)),
                                      "train_data_dir": str(getattr(demo, data)), "output_dir": str(out),
                                      "batch_size": batch, "max_train_steps": updates, "save_steps": 0,
                                      "sample_every_steps": 0, "sample_prompts": []}))
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(config), "--num-processes",
                    str(processes)], check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    times = [e.time for e in read_events(out / "events.jsonl") if e.kind == "progress"]
    return (len(times) - 1 - WARMUP) * batch * processes / (times[-1] - times[WARMUP])


def main() -> str:
    gpus = torch.cuda.device_count()
    if gpus == 1:
        return "One CUDA GPU: 2 processes need 2 GPUs (one each); nothing measured."
    device = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else f"CPU, {os.cpu_count()} cores"
    demo = ensure_demo(Path(tempfile.mkdtemp(prefix="bench-mp-")))
    settings = {"1 thread": (1, 1), "default threads": (1, None), "2 processes": (2, None)}
    rows, load, runs = [], os.getloadavg()[0], itertools.count()
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in CASES.items():
            best = dict.fromkeys(settings, 0.0)
            for order in (list(settings), list(reversed(settings))):
                for setting in order:
                    processes, threads = settings[setting]
                    out = Path(tmp) / f"run-{next(runs)}"
                    best[setting] = max(best[setting], samples_per_s(demo, case, processes, out, threads))
            single, whole, two = best.values()
            rows.append(f"| {name} | {case[3]} | {single:.1f} | {whole:.1f} | {two:.1f} | **{two / single:.2f}x** | "
                        f"{two / whole:.2f}x |")
            print(rows[-1], flush=True)
    return "\n".join([
        f"{device}, torch {torch.__version__}, `train.py --num-processes N` (N=2 through accelerate, "
        f"{'nccl' if gpus else 'gloo'}); batch per process as listed; updates after the first {WARMUP} timed, best of 2; "
        f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        "", "| model | batch per process | 1 process, 1 thread | 1 process, default threads | 2 processes "
        "| 2 / 1 (1 thread) | 2 / 1 (default threads) |", "|---|---|---|---|---|---|---|", *rows,
        "", "samples/s."])


if __name__ == "__main__":
    report = main()
    print(report)
    if "--write" in sys.argv:
        update_results("multi_process", report)
