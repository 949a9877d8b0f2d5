"""Loading base models (diffusers pipelines, single-file checkpoints with the configs shipped in configs/, causal
LMs): below engines/, export/ and preview/, which all read models the same way through here."""

from pathlib import Path

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
