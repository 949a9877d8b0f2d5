"""What the GPU bench prints: progress lines as they happen, errors in one table-safe line, no library chatter."""

from __future__ import annotations


def say(text: str) -> None:
    print(text, flush=True)  # flushed: a 10-minute command's log must show how far it got


def error_text(exc: BaseException) -> str:
    """'OutOfMemoryError: CUDA out of memory.': the first line only, short and without '|' (it goes in a table)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300].replace("|", "/")


def quiet_libraries() -> None:
    """No warnings and no progress bars from transformers and diffusers: they would bury the results."""
    import warnings
    warnings.filterwarnings("ignore")
    for name in ("transformers", "diffusers"):
        try:
            module = __import__(f"{name}.utils.logging", fromlist=["set_verbosity_error"])
            module.set_verbosity_error()
            module.disable_progress_bar()
        except Exception:  # noqa: BLE001
            pass
