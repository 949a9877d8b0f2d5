"""GPU bench: does the memory planner's config fit each card, how fast does it train, how long a context fits.

On a CUDA machine with >= 24 GB (written for a lent H100/H200: 16 cores, no internet, <= 10 min per command):

1. Builds full-size models with random weights from the shipped configs, no download: SD1.5 and SDXL from
   studio/models/configs/<family> (each component `from_config` on the GPU, fp16, `save_pretrained` next to the
   shipped model_index.json, tokenizers and scheduler) and Llama 3.1 8B from studio/models/configs (bf16, built
   on the GPU, saved as a transformers folder with a small byte-level BPE tokenizer trained here, as studio/demo
   does). Plus 16 generated images per image family at its resolution and a chat jsonl with replies longer than
   max_length. All of it lives under --work and is reused by a later run on the same machine.
2. Emulates 24/16/12/8 GB cards with `torch.cuda.set_per_process_memory_fraction((card - 0.6) / device)`: the
   0.6 GB is the CUDA context the plan counts outside torch's allocator (studio.plan.memory.CUDA_CONTEXT_GB), which a
   real card of that size also loses. For each card and model it runs the planner's config
   (`studio.plan.reference.fit_reference`) through the real trainer, `studio.loop.train`, for --steps updates, plus
   variants (fp16 / bf16, adamw / adamw8bit, QLoRA, SD1.5 batch 8). Cases whose fitted configs are identical run
   once, on the smallest card, and the other cards point at that run; plans that say "too big" are not run.
   Measured: s/it after the first 5 updates, samples/s or tokens/s, MFU (planned FLOPs per sample x samples per
   update / s per update / the device's dense bf16 peak), the GPU's busy share and kernels per update over the last
   3 updates (torch.profiler; those stay out of s/it), peak allocated memory from the first update on vs the
   plan's allocated part, peak reserved, the load phase's peak, back-offs, and whether the last loss is finite.
3. Longest context of Llama 3.1 8B QLoRA r=32 with gradient checkpointing at a 24 GB cap: a plain transformers+peft
   loop (bitsandbytes NF4, peft's prepare_model_for_kbit_training with its default checkpointing, the model's own
   loss) against the studio trainer's pieces (make_engine + engine.load, engine.collate, engine.loss,
   studio.optim.build_optimizer; one update per length). The trainer itself would reload the 8B model for every
   length tried; the pieces load it once. Lengths double from 1024 until one runs out of memory, then bisect to
   1/8. The plain loop runs first, so anything the first search left behind can only count against the studio.

Run in parts to stay inside a 10-minute command (--only takes any of sd15, sdxl, flux1, llm, llm-ctx; all of them take
~15 min and need --budget-s 1000). Estimated times on an H100, model building included:
    python bench/gpu.py --only sd15,sdxl --json $OUT/gpu-images.json     # ~4-5 min (12 cases, 7 runs)
    python bench/gpu.py --only flux1 --json $OUT/gpu-flux.json           # builds and saves 12 B + 4.7 B random weights
    python bench/gpu.py --only llm --json $OUT/gpu-llm.json              # ~6 min (builds and saves the 8B model)
    python bench/gpu.py --only llm-ctx --json $OUT/gpu-ctx.json          # ~6 min (reuses it if --work still has it)
    python bench/gpu.py --render gpu-*.json --write    # anywhere: into RESULTS.md
--json keeps every finished case (written after each one, merged with what the file already holds), --write
updates the `## gpu` section of bench/RESULTS.md after each case, --budget-s (default 420) starts no case and no
context length after that many seconds. --dry-run runs the same code on the CPU with the demo's tiny models
(numbers meaningless; for checking the bench itself). Without CUDA (and without --dry-run / --render) it says so
and exits 0.

The code, one job a module beside this command line: gpu_parts (the parts), gpu_cases (cases from the planner),
gpu_models (models and data), gpu_runs (one trainer run), gpu_context (the context search), gpu_session (setup,
budget, results so far), gpu_device (CUDA or the dry-run CPU), gpu_speed (MFU), gpu_busy (the GPU's busy share),
gpu_report (the report), gpu_log (printing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never wait on a hub lookup
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # loading bars would bury the results in the log
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_cases import IMAGE_PARTS  # noqa: E402
from gpu_device import GB, Cuda, DryCpu  # noqa: E402
from gpu_log import error_text, quiet_libraries, say  # noqa: E402
from gpu_parts import run_image_part, run_llm_parts  # noqa: E402
from gpu_report import cell, render  # noqa: E402
from gpu_session import Session, dry_setup, full_setup  # noqa: E402
from gpu_speed import DEFAULT_STEPS  # noqa: E402

NO_CUDA = "bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure here."
PARTS = (*IMAGE_PARTS, "llm", "llm-ctx")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="updates per run (the first few untimed)")
    parser.add_argument("--write", action="store_true", help="update the '## gpu' section of bench/RESULTS.md")
    parser.add_argument("--json", help="keep the results in this JSON file (merged with what it holds)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "studio-gpu-bench"),
                        help="where models, data and runs go (models are reused)")
    parser.add_argument("--budget-s", type=float, default=420, help="start no case after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU with tiny models")
    parser.add_argument("--render", nargs="+", metavar="JSON", help="only merge these result files and report")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.steps < 3:
        parser.error("--steps must be at least 3")
    if args.dry_run and args.write:
        parser.error("--dry-run numbers mean nothing: it does not --write")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        say(render(args.render, args.write))
        return 0
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        say(NO_CUDA)
        return 0
    quiet_libraries()
    gpu = DryCpu() if args.dry_run else Cuda()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    setup = dry_setup(work) if args.dry_run else full_setup()
    session = Session(args, gpu, setup)
    free_disk = shutil.disk_usage(work).free / GB
    say(f"{session.meta['device']}: {cell(session.meta['total_gb'], '.1f', ' GiB')}, peak "
        f"{cell(session.meta['peak_flops'] and session.meta['peak_flops'] / 1e12, '.0f', ' TFLOP/s')}; parts "
        f"{', '.join(args.parts)}; {args.steps} steps; work {work} ({free_disk:.0f} GB free disk)")
    parts = [(family, lambda family=family: run_image_part(session, family)) for family in IMAGE_PARTS
             if family in args.parts]
    if "llm" in args.parts or "llm-ctx" in args.parts:
        parts.append(("llm", lambda: run_llm_parts(session, args.parts)))
    try:
        for name, run in parts:
            try:
                run()
            except Exception as exc:  # noqa: BLE001 - a part that breaks must not take the others with it
                session.record({"id": f"{name}/part", "kind": "error", "status": f"error: {error_text(exc)}"})
    finally:
        say("\n" + session.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
