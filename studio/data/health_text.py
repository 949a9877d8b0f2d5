"""The health check's report as Markdown: what `tools/check_dataset.py` prints and the Dataset tab shows."""

from __future__ import annotations

from studio.data.health import BLUR_THRESHOLD, HASH_SIDE, HealthReport, caption_lengths
from studio.data.tag_editor import split_tags

TOP_TAGS = 15
LISTED = 20  # items listed per warning before "... and N more"


def report_markdown(report: HealthReport) -> str:
    sections = [_verdict(report), _settings(report), _steps(report), _duplicates(report), _blurry(report),
                _low_res(report), _unread(report), _captions(report), _tags(report), _buckets(report)]
    return "\n\n".join(s for s in sections if s)


def _verdict(report: HealthReport) -> str:
    head = f"## Dataset health: {report.folder.name}\n"
    warnings = f"{report.warning_count} warning(s) below" if report.warning_count else "no warnings"
    if not report.blocking:
        return head + f"**✔ Training accepts this dataset** ({len(report.training)} image(s)); {warnings}."
    return (head + f"**✖ Training would refuse this dataset: {len(report.problems)} problem(s)** (fix them first; "
            f"{warnings}):\n" + _listing(report.problems, limit=len(report.problems)))


def _settings(report: HealthReport) -> str:
    cfg = report.cfg
    buckets = "aspect-ratio buckets" if cfg.enable_bucket else "square crops (enable_bucket off)"
    source = "the config" if report.configured else "the default settings (choose a config for yours)"
    return (f"Checked for resolution {cfg.resolution} with {buckets}, batch {cfg.batch_size} × "
            f"{cfg.gradient_accumulation_steps} accumulation, repeats {cfg.repeats}: {source}.")


def _steps(report: HealthReport) -> str:
    cfg = report.cfg
    if report.steps is None:
        return "### Steps and time\n- no training images yet: steps and time unknown."
    how = "max_train_steps" if cfg.max_train_steps else f"{cfg.epochs} epoch(s) of {report.steps // cfg.epochs}"
    return (f"### Steps and time\n- {report.steps} steps ({how}) on {len(report.training)} training image(s)\n"
            f"- time: {report.time}")


def _duplicates(report: HealthReport) -> str:
    if not report.duplicates:
        return ""
    lines = [f"{d.first.name} ≈ {d.second.name} ({_difference(d.bits)})" for d in report.duplicates]
    return (f"### ⚠ Near-duplicates: {len(report.duplicates)} pair(s)\nThey weigh twice in training; keep one of "
            "each pair unless that is what you want (compared in grey: a recoloured copy counts too).\n"
            + _listing(lines))


def _difference(bits: int) -> str:
    return "identical perceptual hash" if bits == 0 else f"{bits} of {HASH_SIDE ** 2} hash bits differ"


def _blurry(report: HealthReport) -> str:
    blurry = report.blurry
    if not blurry:
        return ""
    lines = [f"{f.name}: sharpness {f.sharpness:.0f}" for f in blurry]
    return (f"### ⚠ Blurry: {len(blurry)} image(s)\nVariance of the Laplacian at the training size under "
            f"{BLUR_THRESHOLD:.0f}; the LoRA learns the blur too. Replace them or caption them as blurry.\n"
            + _listing(lines))


def _low_res(report: HealthReport) -> str:
    small = report.low_res
    if not small:
        return ""
    lines = [f"{f.name}: {f.size[0]}x{f.size[1]} px, enlarged ×{f.upscale:.1f} to fill {f.bucket[0]}x{f.bucket[1]}"
             for f in small]
    return (f"### ⚠ Below the training resolution: {len(small)} image(s)\nEnlarged images train soft; use larger "
            f"ones or a lower resolution.\n" + _listing(lines))


def _unread(report: HealthReport) -> str:
    return f"### ⚠ Not checked: {len(report.unread)} image(s)\n" + _listing(report.unread) if report.unread else ""


def _captions(report: HealthReport) -> str:
    total = len(report.images) + len(report.unread)
    filled = sum(1 for c in report.captions.values() if c.strip())
    lines = [f"{filled} of {total} image(s) captioned" + (f" ({100 * filled / total:.0f} %)" if total else "")]
    for what, (low, mid, high) in caption_lengths(report.captions).items():
        lines.append(f"{what} per caption: {low} / {mid:g} / {high} (fewest / median / most)")
    return "### Captions\n" + _listing(lines)


def _tags(report: HealthReport) -> str:
    frequencies = report.tag_frequencies()
    if not frequencies:
        return ""
    rows = "\n".join(f"| {tag} | {count} |" for tag, count in frequencies[:TOP_TAGS])
    once = [tag for tag, count in frequencies if count == 1]
    lines = [f"{len(once)} tag(s) used once: " + ", ".join(once[:LISTED]) + (" ..." if len(once) > LISTED else "")
             if once else "no tag is used only once", _trigger(report)]
    return (f"### Tags: {len(frequencies)} distinct\n| tag (top {min(TOP_TAGS, len(frequencies))}) | images |\n"
            f"|---|---|\n{rows}\n\n" + _listing(lines))


def _trigger(report: HealthReport) -> str:
    trigger = report.cfg.trigger_word
    if not trigger:
        return "no trigger_word set" + ("" if report.configured else " (choose a config)")
    tags = [split_tags(c) for c in report.captions.values()]
    first = sum(1 for t in tags if t[:1] == [trigger])
    inside = sum(1 for t in tags if trigger in t[1:])
    missing = len(tags) - first - inside
    return (f"trigger word '{trigger}': first in {first}, later in {inside}, absent from {missing} caption(s); "
            "training puts it first in every caption")


def _buckets(report: HealthReport) -> str:
    rows = report.bucket_rows()
    if not rows:
        return ""
    table = "\n".join(f"| {w}x{h} | {n} | {100 * mean:.0f} % | {100 * most:.0f} % |"
                      for (w, h), n, mean, most in rows)
    return ("### Buckets\n| bucket | images | cropped (mean) | cropped (most) |\n|---|---|---|---|\n" + table)


def _listing(lines: list[str], limit: int = LISTED) -> str:
    more = [f"... and {len(lines) - limit} more"] if len(lines) > limit else []
    return "\n".join(f"- {line}" for line in lines[:limit] + more)
