"""Small helpers every tab uses: status lines, and turning a user error into a message instead of a traceback."""

from __future__ import annotations

import functools
import html
from typing import Callable

import gradio as gr

from studio.errors import StudioError


def ok(message: str) -> str:
    return f"✔ {message}"


def note(message: str) -> str:
    return f"ℹ {message}"


def error(message: str | Exception) -> str:
    """A user error as Markdown: the first line bold, the rest (e.g. one problem a line) below it, verbatim."""
    first, *rest = str(message).strip().splitlines() or ["Error"]
    body = f"\n\n<pre class='studio-problems'>{html.escape(chr(10).join(rest), quote=False)}</pre>" if rest else ""
    return f"✖ **{html.escape(first, quote=False)}**{body}"


def reports_errors(outputs: int) -> Callable:
    """Decorate a handler whose first output is a status line: a StudioError becomes that line, and the handler's
    other `outputs - 1` outputs are left as they are. Other exceptions are bugs and keep gradio's error handling."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except StudioError as exc:
                if outputs == 1:
                    return error(exc)
                return (error(exc), *[gr.skip()] * (outputs - 1))
        return wrapper

    return decorate


def duration_text(seconds: float) -> str:
    """1h05m or 3m07s."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def choices_update(choices: list, value=None, keep: str | None = None) -> dict:
    """A dropdown update with new choices; keeps the current value `keep` when it is still offered."""
    values = [c[1] if isinstance(c, tuple) else c for c in choices]
    if value is None and keep in values:
        value = keep
    return gr.update(choices=choices, value=value)


def help_table(keys: list[str]) -> str:
    """Markdown table of config keys and their help text (the same text as `train.py --help`)."""
    from studio.config import field_help
    rows = "\n".join(f"| `{key}` | {field_help(key)} |" for key in keys)
    return "| key | what it does |\n|---|---|\n" + rows
