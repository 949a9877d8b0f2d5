"""bench/gpu.py and its gpu_*.py modules: the parts that need no GPU — the peak-FLOPs table, MFU, the case list
from the planner, the context search, the report — and that it says so and exits 0 where there is no CUDA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu  # noqa: E402  (first: it puts the repository on sys.path for the modules beside it)
import gpu_busy  # noqa: E402
import gpu_cases  # noqa: E402
import gpu_context  # noqa: E402
import gpu_report  # noqa: E402
import gpu_speed  # noqa: E402

from studio.config import RunConfig  # noqa: E402
from studio.plan.reference import CARDS_GB, fit_reference  # noqa: E402
from studio.plan.report import MemoryPlan, PlanRow  # noqa: E402


def test_peak_flops_by_device_name():
    assert gpu_speed.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_speed.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_speed.peak_flops("NVIDIA H200") == 989e12
    assert gpu_speed.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_speed.peak_flops("NVIDIA GeForce RTX 4090") == 165e12  # dense, not the 330 with sparsity
    assert gpu_speed.peak_flops("NVIDIA GeForce RTX 3090") == 71e12
    assert gpu_speed.peak_flops("Tesla T4") is None


def test_mfu_and_step_time_arithmetic():
    # SD1.5 at 512 px: 1.781 TFLOP per sample, batch 8, 0.1 s per update on an H100 SXM.
    assert gpu_speed.mfu(1.781e12, 8, 0.1, 989e12) == pytest.approx(1.781e12 * 8 / 0.1 / 989e12)
    assert gpu_speed.mfu(1e12, 4, 0.5, 1e14) == pytest.approx(0.08)
    assert gpu_speed.mfu(1e12, 4, 0.5, None) is None  # unknown device: no MFU
    assert gpu_speed.mfu(None, 4, 0.5, 1e14) is None
    assert gpu_speed.mfu(1e12, 4, 0.0, 1e14) is None
    # Update end times 0, 1, 2, 3.5, 5: after one warm-up update, 4 updates in 5 s.
    assert gpu_speed.seconds_per_step([0.0, 1.0, 2.0, 3.5, 5.0], 1) == pytest.approx(1.25)
    assert gpu_speed.seconds_per_step([0.0, 1.0, 2.5], 2) == pytest.approx(1.5)
    assert gpu_speed.seconds_per_step([0.0], 1) is None
    assert gpu_speed.warmup_for(30) == 5 and gpu_speed.warmup_for(6) == 2 and gpu_speed.warmup_for(3) == 1


def test_busy_share_counts_overlapping_kernels_once():
    assert gpu_busy.busy_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4
    assert gpu_busy.busy_seconds([]) == 0


def test_busy_profile_on_the_cpu_counts_copies_and_no_kernels():
    busy = gpu_busy.BusyProfile(gpu_busy.PROFILED + 1)
    x = torch.ones(4)
    for update in range(1, gpu_busy.PROFILED + 2):
        x.to(torch.float64)  # one aten::copy_ per update
        busy.on_update(update)
    busy.close()
    assert busy.figures == {"gpu_busy": None, "kernels_per_update": None, "copies_per_update": 1.0}


def test_context_search_doubles_then_bisects():
    tried = []

    def fits(n):
        tried.append(n)
        return n <= 10_000

    ok, bad = gpu_context.search_longest(fits, 1024, 131072)
    assert ok <= 10_000 < bad and bad - ok <= max(256, ok // 8)
    assert tried[:5] == [1024, 2048, 4096, 8192, 16384] and len(tried) <= 9
    assert gpu_context.search_longest(lambda n: n <= 300, 1024, 131072) == (256, 512)  # the start already fails
    assert gpu_context.search_longest(lambda n: True, 1024, 4096) == (4096, None)  # nothing failed up to the limit
    assert gpu_context.search_longest(lambda n: False, 1024, 4096) == (0, 256)
    assert gpu_context.search_longest(lambda n: True, 1024, 131072, out_of_time=lambda: True) == (0, None)


def test_measured_longest_within_the_plans_share_of_the_card():
    """The measured counterpart of the planner's longest: trained, and peak + CUDA context <= 92 % of 24 GB."""
    tries = [[8192, True, 2.0, 14.0, 1.0], [16384, True, 3.0, 21.5, 1.0], [20480, False, 1.0, 22.9, None],
             [12288, True, 2.5, 18.0, 1.0]]
    assert gpu_context.within_share(tries, 24) == 12288  # 16,384 trained, but at 21.5 + 0.6 GB > 22.08 GB
    assert gpu_context.within_share([[1024, True, 1.0, None, 1.0]], 24) is None  # a dry run measures no peak


def _fake_fit(name, card_gb, **keys):
    """A planner stand-in: batch 4 on 24/16 GB, 2 on 12, 1 on 8 (which it calls too big)."""
    cfg = RunConfig(batch_size=keys.get("batch_size", {24: 4, 16: 4, 12: 2, 8: 1}[card_gb]),
                    mixed_precision=keys.get("mixed_precision", "bf16"), optimizer=keys.get("optimizer", "adamw"),
                    vram_budget_gb=card_gb)
    peak = {24: 6.0, 16: 6.0, 12: 5.0, 8: 9.0}[card_gb]
    return type("Fitted", (), {"cfg": cfg, "plan": MemoryPlan([PlanRow("all", peak)], card_gb, "fake"),
                               "family": "sd15"})()


def test_identical_configs_share_one_run_and_too_big_plans_are_not_run():
    cases = {case.id: case for case in gpu_cases.plan_cases(["sd15"], fit=_fake_fit)}
    assert set(cases) == {f"sd15/planner/{card}" for card in CARDS_GB} | {
        f"sd15/{label}/{card}" for label, card, _ in gpu_cases.VARIANTS["sd15"]}
    assert cases["sd15/planner/24"].same_as == "sd15/planner/16"  # same config: run on the smaller card
    assert cases["sd15/planner/16"].same_as is None and cases["sd15/planner/12"].same_as is None
    assert "too big" in cases["sd15/planner/8"].skip
    assert cases["sd15/batch 8/24"].fitted.cfg.batch_size == 8 and cases["sd15/batch 8/24"].same_as is None
    rows = {case.id: gpu_cases.case_row(case) for case in cases.values()}
    assert rows["sd15/planner/8"]["status"].startswith("not run: the plan says too big")
    assert rows["sd15/planner/24"]["status"] == "same config as sd15/planner/16"
    assert rows["sd15/planner/12"]["config"] == "2×1, 512 px, bf16, adamw, ckpt off, r8"


def _run_row(id_, card, status="ok", **values):
    family, case = id_.split("/")[:2]
    row = {"id": id_, "kind": "run", "family": family, "model": gpu_cases.MODEL_NAMES[family], "case": case,
           "card_gb": card, "config": "4×1, 1024 px, bf16, adamw, ckpt on, r8", "batch_size": 4, "accumulation": 1,
           "length": 1024, "planned_peak_gb": 10.1, "planned_alloc_gb": 9.5, "verdict": "fits", "same_as": None,
           "status": status}
    row.update(values)
    return row


def fake_results():
    return [
        _run_row("sd15/batch 8/24", 24, config="8×1, 512 px, bf16, adamw, ckpt off, r8", batch_size=8, length=512,
                 s_per_it=0.05, samples_per_s=160.0, mfu=0.41, measured_alloc_gb=9.2, ratio=9.2 / 9.5,
                 measured_reserved_gb=10.0, load_peak_gb=3.0, loss=0.12, gpu_busy=0.583, kernels_per_update=2104.0),
        _run_row("sdxl/planner/24", 24, status="same config as sdxl/planner/12", same_as="sdxl/planner/12"),
        _run_row("sdxl/planner/12", 12, s_per_it=0.8, samples_per_s=5.0, mfu=0.3, measured_alloc_gb=12.0,
                 ratio=12.0 / 9.5, measured_reserved_gb=12.5, load_peak_gb=8.0, loss=0.2,
                 planned_phases_gb={"encode": 1.5, "cache": 1.8, "train": 9.5},
                 measured_phases_gb={"encode": 1.4, "cache": 2.0, "train": 5.0}),
        _run_row("sdxl/fp16/24", 24, status="error: OutOfMemoryError: CUDA out of memory."),
        _run_row("llm/planner/8", 8, status="not run: the plan says too big (9.0 GB on a 8 GB card)"),
        {"id": "llm-ctx", "kind": "context", "family": "llm", "model": "Llama 3.1 8B", "card_gb": 24,
         "status": "ok", "config": "1×1, 1024 tok, NF4+bf16, adamw, ckpt on, r32", "start": 1024,
         "planned_longest": 12288, "planned_alloc_at_longest_gb": 20.0, "measured_alloc_at_longest_gb": 21.0,
         "plain": {"longest": 4096, "longest_within_share": 4096, "first_failed": 8192,
                   "tries": [[4096, True, 2.0, 18.0, 11.9], [8192, False, 1.0, 23.0, None]]},
         "studio": {"longest": 16384, "first_failed": 18432, "tries": [[16384, True, 8.0, 21.0, 11.9]]}},
    ]


def test_report_renders_targets_runs_and_context():
    report = gpu_report.format_report(fake_results(), {"device": "NVIDIA H100 80GB HBM3", "total_gb": 79.2,
                                                       "peak_flops": 989e12, "date": "2026-01-02", "torch": "2.13",
                                                       "cuda": "13.0", "steps": 30})
    assert "**NVIDIA H100 80GB HBM3**" in report and "2026-01-02" in report and "989 TFLOP/s" in report
    targets = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if line.startswith("| ")}
    assert targets["SD1.5 512 px batch 8: MFU ≥ 35 %"].endswith(
        "| 41.0 % (8×1, 512 px, bf16, adamw, ckpt off, r8, GPU busy 58 %) | yes |")
    assert targets["SDXL 1024 px: MFU ≥ 30 %"].endswith("| 30.0 % (4×1, 1024 px, bf16, adamw, ckpt on, r8) | yes |")
    assert targets["Llama 3.1 8B bf16 LoRA: MFU ≥ 45 %"].endswith("| not measured | — |")
    sdxl = targets["SDXL 1024 px on a 24 GB card: fits with batch ≥ 2"]
    assert "the 12 GB run" in sdxl and sdxl.endswith("| yes |")
    plan = targets["plan within ±15 % of measured (allocated)"]
    assert "1 of 2 runs; worst sdxl/planner/12 measured/planned 1.26" in plan and plan.endswith("| **no** |")
    assert targets["8B QLoRA r=32, 24 GB: context ≥ 4× the plain loop's"].endswith(
        "| 16,384 vs 4,096 tokens = 4.00× | yes |")
    runs = [line for line in report.splitlines() if line.startswith(("| SD1.5 |", "| SDXL |", "| Llama 3.1 8B |"))]
    assert len(runs) == 5
    assert any("error: OutOfMemoryError" in line for line in runs)
    assert any("| **1.26** |" in line for line in runs)  # outside ±15 %: marked
    assert "| 160.00 img/s | 41.0 % | 58 % (2,104) |" in runs[0]
    assert "| 4,096 | 4,096 | 8,192 | 2.00 | 2,048 | 18.00 GB | 2 |" in report
    assert "The planner's longest fitting max_length for the studio side: 12,288" in report
    # each phase planned / measured: loading phases on their own, training ones from the first update on
    assert "- SDXL planner 12 GB: encode 1.50 / 1.40, cache 1.80 / 2.00, train 9.50 / 12.00" in report


def test_report_says_what_was_not_measured():
    report = gpu_report.format_report([], {"device": "X", "steps": 30})
    assert report.count("| not measured | — |") == 6 and "### Runs" not in report


def test_parts_merge_from_json_files(tmp_path):
    first, second = fake_results()[:3], fake_results()[3:]
    meta = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-01-02", "steps": 30}
    (tmp_path / "a.json").write_text(json.dumps({"meta": meta, "results": first}))
    (tmp_path / "b.json").write_text(json.dumps({"meta": {**meta, "date": "2026-01-03"}, "results": second}))
    report = gpu_report.render([str(tmp_path / "a.json"), str(tmp_path / "b.json")], write=False)
    assert "2026-01-03" in report and "16,384 vs 4,096" in report and "41.0 %" in report
    rerun = dict(first[0], mfu=0.2)
    merged = gpu_report.merge_results(first, [rerun])
    assert [row["id"] for row in merged] == [row["id"] for row in first] and merged[0]["mfu"] == 0.2


def test_parts_and_flags_are_checked():
    assert gpu.parse_args(["--only", "sd15,llm-ctx"]).parts == ["sd15", "llm-ctx"]
    assert gpu.parse_args([]).parts == list(gpu.PARTS)
    with pytest.raises(SystemExit):
        gpu.parse_args(["--only", "sd15,flux"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA this would run the bench")
def test_without_cuda_it_says_so_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--write"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == gpu.NO_CUDA


@pytest.mark.slow
def test_cases_come_from_the_planner():
    """The real planner on the reference models, every family and card (meta device: ~40 s on 2 cores)."""
    cases = gpu_cases.plan_cases(["sd15", "sdxl", "llm"])
    by_id = {case.id: case for case in cases}
    for family in ("sd15", "sdxl", "llm"):
        for card in CARDS_GB:
            case = by_id[f"{family}/planner/{card}"]
            assert case.fitted.cfg.vram_budget_gb == card  # fitted for that card
            assert (case.skip is not None) == (case.fitted.plan.verdict == "too big")
            if case.same_as:
                runner = by_id[case.same_as]
                assert runner.card_gb < card and runner.skip is None and runner.same_as is None
                assert gpu_cases.signature(runner.fitted.cfg) == gpu_cases.signature(case.fitted.cfg)
    xl = by_id["sdxl/planner/24"].fitted
    assert xl.cfg.resolution == 1024 and xl.cfg.batch_size >= 2 and xl.plan.fits
    b8 = by_id["sd15/batch 8/24"].fitted
    assert b8.cfg == fit_reference("SD1.5", 24, batch_size=8).cfg
    assert b8.cfg.batch_size == 8 and b8.cfg.resolution == 512
    assert by_id["llm/QLoRA/24"].fitted.cfg.load_in_4bit
    assert sum(1 for case in cases if not case.skip and not case.same_as) <= 12  # what the GPU runs, in minutes


@pytest.mark.slow
def test_dry_run_goes_through_every_step_on_the_cpu(tmp_path):
    """The GPU code path on the CPU with the demo's tiny models: trainer runs, 4-bit, the context search, JSON."""
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--only", "llm,llm-ctx",
                           "--steps", "3", "--work", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["id"]: row for row in json.loads(out.read_text())["results"]}
    assert {f"llm/planner/{card}" for card in CARDS_GB} <= set(rows)
    ran = [row for row in rows.values() if row.get("kind") == "run" and "seconds" in row]
    for row in ran:
        if "NF4" in row["config"]:  # QLoRA needs CUDA: the error is recorded and the bench goes on
            assert row["status"].startswith("error: StudioError: load_in_4bit"), row
        else:
            assert row["status"] == "ok" and row["tokens_per_s"] > 0 and row["s_per_it"] > 0, row
    assert any(row["status"] == "ok" for row in ran)
    for row in rows.values():
        if row["status"].startswith("not run"):
            assert row["verdict"] == "too big"
    ctx = rows["llm-ctx"]
    assert ctx["status"] == "ok" and ctx["plain"]["longest"] == 512 and ctx["studio"]["longest"] == 512
    assert "DRY RUN" in done.stdout and "### Longest context" in done.stdout
