"""What the command-line tools share: offline-friendly environment, clean user errors, tqdm progress."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

import yaml

from studio.config import ConfigError
from studio.errors import StudioError


# Library warnings that ask nothing of a user: bitsandbytes' optional CPU kernel from a hub package we do not install,
# and transformers' PIL fallback for image processors (torchvision stays off CPU installs on purpose).
KNOWN_NOISE = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
               "transformers.utils.import_utils": "requires torchvision (not installed)"}


# Python warnings that ask nothing of a user either: transformers 5 renaming the gradient checkpointing methods that
# peft still calls by their old names, and peft noting a second adapter (the preview stacks LoRAs on purpose).
KNOWN_WARNINGS = [(FutureWarning, r"`(is_gradient_checkpointing|gradient_checkpointing_enable)` is deprecated"),
                  (UserWarning, r"Already found a `peft_config` attribute in the model")]


def configure_environment() -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for logger, text in KNOWN_NOISE.items():
        logging.getLogger(logger).addFilter(lambda record, text=text: text not in record.getMessage())
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """A StudioError ends the program with its message and exit code 2 — no traceback for user mistakes."""
    try:
        yield
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def field_flags_help() -> str:
    from studio.config import FIELDS, field_help
    return "config keys:\n" + "\n".join(f"  {name:<28} {field_help(name)}" for name in FIELDS)


def tqdm_listener():
    """An event listener drawing a tqdm bar: step/total, loss, it/s, ETA; log lines printed above it."""
    from tqdm import tqdm

    bar = None

    def listen(event) -> None:
        nonlocal bar
        # A failure is printed once, by exit_on_user_error (or as the traceback), not here as well.
        message = "" if event.kind == "failed" else event.message
        if event.kind == "start":
            bar = tqdm(total=event.total, initial=event.step, unit="step", dynamic_ncols=True)
        if bar is None:
            if message:
                print(message, file=sys.stderr)
            return
        if event.kind == "progress":
            bar.update(event.step - bar.n)
            bar.set_postfix(loss=f"{event.data['loss']:.4f}", lr=f"{event.data['lr']:.2e}")
        elif message:
            bar.write(message)
        if event.kind in ("done", "stopped", "failed"):
            bar.close()

    return listen


def overrides_from_pairs(pairs: list[str]) -> dict:
    """`key=value` strings (CLI --set) → a dict, values parsed as YAML so numbers and lists keep their type."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        why = "it has no '='"
        if sep:
            try:
                out[key.strip()] = yaml.safe_load(value) if value.strip() else None
                continue
            except yaml.YAMLError as exc:  # its one-line `problem`, without the position dump
                why = f"the value is not valid YAML ({getattr(exc, 'problem', None) or exc})"
        raise ConfigError(f"--set {pair!r}: {why}. Write --set key=value, the value in YAML syntax, e.g. "
                          "--set lora_rank=16 'sample_prompts=[a cat, a dog]' (quote a value with ': ' in it: "
                          "'name=\"a: b\"').")
    return out
