"""The GPU bench's report: the targets met or not, one line per run, the context search; results merged from
several parts (JSON files) into the `## gpu` section of bench/RESULTS.md."""

from __future__ import annotations

import json
from pathlib import Path

from bench.results import update_results
from gpu_cases import CONTEXT_CARD_GB, CONTEXT_RANK
from gpu_speed import DEFAULT_STEPS, warmup_for
from studio.plan.memory import CUDA_CONTEXT_GB

PLAN_TOLERANCE = 0.15  # measured allocated peak within ±15 % of the plan's allocated part
# issue 24: (case, what it is, MFU target); each alone on the card (a part of its own: bench/gpu.py)
MFU_TARGETS = (("sd15/batch 8/24", "SD1.5 512 px batch 8", 0.35), ("sdxl/planner/24", "SDXL 1024 px", 0.30),
               ("llm/planner/24", "Llama 3.1 8B bf16 LoRA", 0.45))
CONTEXT_TARGET = 4.0  # studio's longest context / the plain loop's


def merge_results(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of both, a new row replacing the old one with its id (in the old one's place)."""
    merged = {row["id"]: row for row in old}
    merged.update({row["id"]: row for row in new})
    return list(merged.values())


def cell(value, spec: str, unit: str = "") -> str:
    """The value in `spec` with its unit, or "—" when it was not measured."""
    return "—" if value is None else f"{value:{spec}}{unit}"


def _by_id(results: list[dict]) -> dict[str, dict]:
    return {row["id"]: row for row in results}


def _measured(row: dict, results: list[dict]) -> dict:
    """The row that holds a case's measurements: its own, or that of the run it shares."""
    return _by_id(results).get(row.get("same_as") or "", row)


def target_rows(results: list[dict]) -> list[tuple[str, str, bool | None]]:
    """(target, what was measured, met: True / False / None when not measured)."""
    rows = _by_id(results)
    out = []

    for case, what, target in MFU_TARGETS:
        run = _measured(rows[case], results) if case in rows else {}
        value = run.get("mfu") if run.get("status") == "ok" else None
        busy = "" if run.get("gpu_busy") is None else f", GPU busy {run['gpu_busy'] * 100:.0f} %"
        text = "not measured" if value is None else f"{value * 100:.1f} % ({rows[case]['config']}{busy})"
        out.append((f"{what}: MFU ≥ {target * 100:.0f} %", text, None if value is None else value >= target))

    xl = rows.get("sdxl/planner/24")
    run = _measured(xl, results) if xl else None
    if not xl or not run or run.get("status") == "pending" or "measured_alloc_gb" not in run:
        out.append(("SDXL 1024 px on a 24 GB card: fits with batch ≥ 2", "not measured", None))
    else:
        ok = run["status"] == "ok" and xl["batch_size"] >= 2 and xl["length"] == 1024
        where = "" if run is xl else f" (the {run['card_gb']:g} GB run)"
        out.append(("SDXL 1024 px on a 24 GB card: fits with batch ≥ 2",
                    f"{xl['config']}: {run['status']}{where}, {cell(run.get('measured_reserved_gb'), '.1f', ' GB')} "
                    f"reserved", ok))

    measured = [r for r in results if r.get("kind") == "run" and r.get("ratio") is not None]
    backed = [r for r in results if r.get("kind") == "run" and r.get("backoffs")]
    if not measured:
        out.append((f"plan within ±{PLAN_TOLERANCE * 100:.0f} % of measured (allocated)", "not measured", None))
    else:
        inside = [r for r in measured if abs(r["ratio"] - 1) <= PLAN_TOLERANCE]
        worst = max(measured, key=lambda r: abs(r["ratio"] - 1))
        text = (f"{len(inside)} of {len(measured)} runs; worst {worst['id']} measured/planned {worst['ratio']:.2f}"
                + (f"; {len(backed)} run(s) backed off" if backed else ""))
        out.append((f"plan within ±{PLAN_TOLERANCE * 100:.0f} % of measured (allocated)", text,
                    len(inside) == len(measured) and not backed))

    ctx = rows.get("llm-ctx")
    plain = (ctx or {}).get("plain", {}).get("longest")
    studio = (ctx or {}).get("studio", {}).get("longest")
    label = f"8B QLoRA r={CONTEXT_RANK}, {CONTEXT_CARD_GB} GB: context ≥ {CONTEXT_TARGET:g}× the plain loop's"
    if not plain or studio is None:
        out.append((label, "not measured", None))
    else:
        ratio = studio / plain
        out.append((label, f"{studio:,} vs {plain:,} tokens = {ratio:.2f}×", ratio >= CONTEXT_TARGET))
    return out


def _throughput(row: dict) -> str:
    if row.get("tokens_per_s") is not None:
        return f"{row['tokens_per_s']:,.0f} tok/s"
    return cell(row.get("samples_per_s"), ".2f", " img/s")


def _busy(row: dict) -> str:
    """'58 % (2,104)': the GPU's busy share over the profiled updates and CUDA kernels per update."""
    if row.get("gpu_busy") is None:
        return "—"
    return f"{row['gpu_busy'] * 100:.0f} % ({row['kernels_per_update']:,.0f})"


def _run_line(row: dict) -> str:
    shared = row.get("same_as")
    if shared or row["status"].startswith("not run"):
        measured = ["—"] * 9
    else:
        ratio = row.get("ratio")
        percent = None if row.get("mfu") is None else row["mfu"] * 100
        measured = [cell(row.get("s_per_it"), ".3f"), _throughput(row), cell(percent, ".1f", " %"), _busy(row),
                    cell(row.get("measured_alloc_gb"), ".2f"), cell(ratio, ".2f"),
                    cell(row.get("measured_reserved_gb"), ".2f"), cell(row.get("load_peak_gb"), ".2f"),
                    cell(row.get("loss"), ".4g")]
        if ratio is not None and abs(ratio - 1) > PLAN_TOLERANCE:
            measured[5] = f"**{measured[5]}**"
    status = row["status"] + (f" (started with {row['leftover_gb']:.1f} GB left by an earlier run)"
                              if row.get("leftover_gb") else "")
    cells = [row["model"], row["case"], f"{row['card_gb']:g} GB", row["config"], status,
             f"{row['planned_alloc_gb']:.2f} / {row['planned_peak_gb']:.2f}"] + measured
    return "| " + " | ".join(cells) + " |"


LOADING = ("load", "encode", "cache")  # phases measured on their own, before the first update


def _phase_line(row: dict) -> str | None:
    planned, measured = row.get("planned_phases_gb") or {}, row.get("measured_phases_gb") or {}
    if not planned or row.get("same_as") or row["status"].startswith("not run"):
        return None
    after_start = row.get("measured_alloc_gb")  # the trainer's phases once updates run
    cells = [f"{phase} {gb:.2f} / {cell(measured.get(phase) if phase in LOADING else after_start, '.2f')}"
             for phase, gb in planned.items()]
    return f"- {row['model']} {row['case']} {row['card_gb']:g} GB: " + ", ".join(cells)


def _context_lines(ctx: dict) -> list[str]:
    lines = ["### Longest context: Llama 3.1 8B, QLoRA r=32, gradient checkpointing, 24 GB card", "",
             f"Studio side: {ctx.get('config', '?')}. One update (forward, backward, optimizer step) per length; "
             f"lengths double from {ctx.get('start', '?')} (the studio's from the plain loop's longest), then bisect "
             "to 1/8.", "",
             "| loop | longest that trained | longest within 92 % of the card (as the plan counts) | shortest that "
             "ran out of memory | s/update there | tokens/s there | peak allocated there | lengths tried |",
             "|---|---|---|---|---|---|---|---|"]
    for side, name in (("plain", "plain transformers+peft (NF4, checkpointing, model loss)"),
                       ("studio", "studio (engine.load / collate / loss, build_optimizer)")):
        data = ctx.get(side) or {}
        if data.get("error"):
            lines.append(f"| {name} | error: {data['error']} | | | | | | {len(data.get('tries', []))} |")
            continue
        best = next((t for t in data.get("tries", []) if t[1] and t[0] == data.get("longest")), None)
        seconds = best[2] if best else None
        lines.append(f"| {name} | {cell(data.get('longest'), ',')} | {cell(data.get('longest_within_share'), ',')} | "
                     f"{cell(data.get('first_failed'), ',')} | "
                     f"{cell(seconds, '.2f')} | {cell(seconds and data['longest'] / seconds, ',.0f')} | "
                     f"{cell(best[3] if best else None, '.2f', ' GB')} | {len(data.get('tries', []))} |")
    if ctx.get("planned_longest") is not None:
        lines += ["", f"The planner's longest fitting max_length for the studio side: {ctx['planned_longest']:,} "
                      f"(fits = planned peak ≤ 92 % of the card)."
                  + (f" At the studio's longest, {ctx['studio']['longest']:,}: planned allocated "
                     f"{ctx['planned_alloc_at_longest_gb']:.2f} GB, measured {ctx['measured_alloc_at_longest_gb']:.2f}"
                     " GB." if ctx.get("planned_alloc_at_longest_gb") and ctx.get("measured_alloc_at_longest_gb")
                     else "")]
    return lines


def format_report(results: list[dict], meta: dict) -> str:
    """The markdown section: device, targets, every run, the context search."""
    peak = meta.get("peak_flops")
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (no MFU)"
    lines = [f"**{meta.get('device', '?')}** ({cell(meta.get('total_gb'), '.1f', ' GiB')}, dense bf16 peak "
             f"{peak_text}), {meta.get('date', '?')}, torch {meta.get('torch', '?')}, CUDA {meta.get('cuda', '?')}.",
             "",
             f"Full-size models with random weights built from the shipped configs. Cards emulated with "
             f"`torch.cuda.set_per_process_memory_fraction((card − {CUDA_CONTEXT_GB} GB context) / device memory)`. "
             f"Every run is `studio.loop.train` on `fit_reference(model, card, **keys).cfg` for "
             f"{meta.get('steps', '?')} updates (the first {warmup_for(meta.get('steps') or DEFAULT_STEPS)} not "
             f"timed). Memory in GB (2^30 bytes); \"allocated\" is torch's max_memory_allocated from the first "
             f"update on, against the plan's allocated part (its peak less the CUDA context); \"load\" is the peak "
             f"while loading.", ""]
    if meta.get("dry_run"):
        lines += ["**DRY RUN on the CPU with the demo's tiny models: the numbers mean nothing.**", ""]
    lines += ["### Targets", "", "| target | measured | met |", "|---|---|---|"]
    for target, text, met in target_rows(results):
        lines.append(f"| {target} | {text} | {'—' if met is None else 'yes' if met else '**no**'} |")
    runs = [row for row in results if row.get("kind") == "run"]
    if runs:
        lines += ["", "### Runs", "",
                  "| model | case | card | config (micro-batch×accum.) | result | planned alloc / peak | s/it | "
                  "throughput | MFU | GPU busy (kernels/update) | measured alloc | meas./plan | reserved | load | "
                  "last loss |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_run_line(row) for row in runs]
        phased = [line for line in map(_phase_line, runs) if line]
        if phased:
            lines += ["", "Image runs by phase, planned / measured allocated GB (measured apart until training "
                      "starts; from then on train, sample, validate and save share the measured alloc):", ""] + phased
    ctx = _by_id(results).get("llm-ctx")
    if ctx:
        lines += [""] + _context_lines(ctx)
        if ctx.get("status", "ok") != "ok":
            lines += ["", f"Context search: {ctx['status']}"]
    errors = [row for row in results if row.get("kind") == "error"]
    if errors:
        lines += ["", "### Errors", ""] + [f"- {row['id']}: {row['status']}" for row in errors]
    return "\n".join(lines)


def render(paths: list[str], write: bool) -> str:
    """The report of the result files merged (a later file's row replaces an earlier one with its id); `write`:
    into bench/RESULTS.md as well."""
    results, metas = [], []
    for path in paths:
        stored = json.loads(Path(path).read_text(encoding="utf-8"))
        results = merge_results(results, stored.get("results", []))
        metas.append(stored.get("meta", {}))
    meta = dict(metas[0]) if metas else {}
    devices = sorted({m.get("device", "?") for m in metas})
    if len(devices) > 1:
        meta["device"] = " + ".join(devices) + " (parts on different devices)"
    meta["date"] = max((m.get("date", "") for m in metas), default="?")
    report = format_report(results, meta)
    if write:
        update_results("gpu", report)
    return report

