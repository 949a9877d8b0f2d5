"""The run config: one typed schema for every training run, YAML in and out.

Each field carries its help text and its allowed values in `metadata`; validation, `train.py --help` and the UI's
tooltips all read them from here. The schema accepts the flat YAML lora-scripts users already write.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf

from studio import config_checks
from studio.errors import StudioError
from studio.families import AUTO, family_names
from studio.fileio import write_text_atomic
from studio.tasks import IMAGE_TASK, TEXT_TASK

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


class ConfigError(StudioError):
    """A config key or value the schema does not accept."""


def _f(default: Any, help: str, **rules: Any) -> Any:
    """A schema field: default, help text, and validation rules (choices, min, max, path, pattern: (regex, what it
    allows))."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


@dataclass
class RunConfig:
    # --- what to train ---------------------------------------------------------------------------------------------
    task_type: str = _f(IMAGE_TASK, "What the LoRA is for.", choices=[IMAGE_TASK, TEXT_TASK])
    base_model: str = _f("", "Diffusers/transformers folder, hub id, or single-file .safetensors checkpoint.",
                         path="model")
    model_family: str = _f(AUTO, "Model family; 'auto' detects it from the weights.",
                           choices=[AUTO, *family_names()])
    base_components: Optional[str] = _f(None, "Flux.1 single-file checkpoints: the diffusers folder or hub id that "
                                        "supplies what the file lacks (text encoders, VAE, tokenizers). Default: "
                                        "black-forest-labs/FLUX.1-schnell (same encoders and VAE as dev).",
                                        path="model")
    preset: Optional[str] = _f(None, "Preset from presets/ this config starts from; its values are defaults here.")
    allow_unsafe_pickle: bool = _f(False, "Allow loading .ckpt/.pt pickle files, which can run arbitrary code.")

    # --- data ------------------------------------------------------------------------------------------------------
    train_data_dir: str = _f("", "Folder of training images (with metadata.csv or .txt captions); for LLMs a folder "
                             "of .txt/.jsonl/.json files or one such file.", path="data")
    metadata_path: Optional[str] = _f(None, "Captions CSV (filename,prompt); default: train_data_dir/metadata.csv.",
                                      path="file")
    trigger_word: str = _f("", "Word put first in every caption (character LoRAs need one).")
    caption_dropout: float = _f(0.0, "Probability of training a step with an empty caption.", min=0.0, max=1.0)
    shuffle_tags: bool = _f(False, "Shuffle comma-separated tags each step (after the first keep_tokens).")
    keep_tokens: int = _f(0, "Number of leading tags that shuffle_tags keeps in place.", min=0)
    repeats: int = _f(1, "How many times each image is seen per epoch.", min=1)
    resolution: int = _f(512, "Training resolution in pixels (the bucket area for aspect-ratio bucketing).",
                         min=64, max=4096)
    enable_bucket: bool = _f(True, "Aspect-ratio bucketing: keep portrait/landscape images uncropped.")
    random_flip: bool = _f(False, "Randomly mirror images horizontally.")
    # 128 MP holds a 100 MP medium-format photo (the largest common camera); decoding one takes ~0.5 GB.
    max_image_pixels: int = _f(128_000_000, "Images with more pixels (width x height) than this are reported as "
                               "a dataset problem instead of decoded; downscale them or raise the limit.",
                               min=1_000_000)
    image_background: str = _f("white", "Colour transparent pixels are put on wherever images are read (training, "
                               "captioning, thumbnails): white, black or #rrggbb.",
                               pattern=(r"white|black|#[0-9a-fA-F]{6}", "white, black or a colour as #rrggbb"))
    cache_latents: bool = _f(True, "Encode each image with the VAE once instead of every epoch (off with random_flip).")
    cache_latents_to_disk: bool = _f(False, "Keep VAE latents and text embeddings in train_data_dir/.studio-cache "
                                     "for later runs on the same images, model and resolution (works with "
                                     "random_flip).")
    data_format: str = _f("auto", "Text data format; 'auto' detects it.",
                          choices=["auto", "text", "alpaca", "sharegpt", "messages"])
    system_prompt: Optional[str] = _f(None, "System prompt added to every conversation that has none.")
    max_length: int = _f(1024, "Maximum tokens per text sample; longer samples are truncated.", min=8)
    train_on_prompt: bool = _f(False, "Also compute loss on system/user tokens (default: assistant tokens only).")
    packing: bool = _f(False, "Pack several short text samples into one sequence of max_length.")
    validation_split: float = _f(0.0, "Fraction of the samples held out (never trained on) to measure a validation "
                                 "loss on; chosen by seed. 0 = off.", min=0.0, max=0.5)
    validation_dir: Optional[str] = _f(None, "A separate folder (or file, for LLMs) of held-out samples in the same "
                                       "format as train_data_dir, instead of validation_split.", path="data")
    validate_every: Optional[int] = _f(None, "Compute the validation loss every N updates (and at the end); "
                                       "default: with every checkpoint (save_steps); 0 = only at the end.", min=0)

    # --- LoRA ------------------------------------------------------------------------------------------------------
    lora_rank: int = _f(8, "LoRA rank (dim).", min=1, max=1024)
    lora_alpha: Optional[float] = _f(None, "LoRA alpha; the update is scaled by alpha/rank. Default: lora_rank "
                                     "(scale 1), on every model family; a preset may set its own.", min=0.0)
    lora_dropout: float = _f(0.0, "Dropout on the LoRA path.", min=0.0, max=1.0)
    network_type: str = _f("lora", "Adapter type: lora; locon (LoRA on the conv layers too); loha, lokr (LyCORIS "
                           "Hadamard / Kronecker products); dora (weight-decomposed LoRA). Images: exported in the "
                           "LyCORIS layout A1111, Forge and ComfyUI load; LLMs: lora or dora.",
                           choices=["lora", "locon", "loha", "lokr", "dora"])
    conv_rank: Optional[int] = _f(None, "locon: rank of the conv layers; default: lora_rank.", min=1, max=1024)
    conv_alpha: Optional[float] = _f(None, "locon: alpha of the conv layers; default: conv_rank.", min=0.0)
    lokr_factor: int = _f(-1, "lokr: the Kronecker factor (-1: as balanced as each layer allows).", min=-1)
    use_rslora: bool = _f(False, "Rank-stabilised scaling, alpha/sqrt(rank) instead of alpha/rank (peft).")
    target_modules: Optional[list[str]] = _f(None, "Module names to adapt; default per family. 'all-linear' for LLMs.")
    train_text_encoder: bool = _f(False, "Also train LoRA on the text encoder(s) (image task).")
    init_lora: Optional[str] = _f(None, "Existing LoRA to start from (incremental training).", path="any")

    # --- optimisation ----------------------------------------------------------------------------------------------
    batch_size: int = _f(4, "Samples per step on the device.", min=1)
    gradient_accumulation_steps: int = _f(1, "Steps whose gradients are summed before an optimizer update.", min=1)
    epochs: int = _f(10, "Passes over the dataset (ignored when max_train_steps is set).", min=1)
    max_train_steps: Optional[int] = _f(None, "Stop after this many optimizer updates.", min=1)
    learning_rate: float = _f(2e-4, "Learning rate of the LoRA weights.", min=0.0)
    text_encoder_lr: Optional[float] = _f(None, "Learning rate of the text-encoder LoRA; default learning_rate.",
                                          min=0.0)
    optimizer: str = _f("adamw", "Optimizer; adamw8bit needs CUDA (bitsandbytes).", choices=["adamw", "adamw8bit"])
    weight_decay: float = _f(0.01, "AdamW weight decay.", min=0.0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", min=0.0)
    lr_scheduler: str = _f("constant", "Learning-rate schedule.",
                           choices=["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                    "polynomial"])
    lr_warmup_steps: int = _f(0, "Warmup updates at the start of the schedule.", min=0)
    mixed_precision: str = _f("auto", "Autocast precision; 'auto' is bf16 where the GPU has it, fp16 (with loss "
                              "scaling) on older GPUs, fp32 ('no') on the CPU.", choices=["auto", "no", "fp16", "bf16"])
    gradient_checkpointing: bool = _f(False, "Trade compute for memory by recomputing activations.")
    offload_activations: bool = _f(False, "LLMs with gradient checkpointing: keep each layer's checkpointed input "
                                   "in CPU memory until the backward needs it (copied while the GPU computes): "
                                   "long max_length on smaller cards, for a few % more time per step.")
    torch_compile: bool = _f(False, "Compile the UNet / LLM with torch.compile: faster steps on GPUs after "
                             "a minute or more of compiling.")
    load_in_4bit: bool = _f(False, "Store the frozen base in 4-bit NF4 and compute in 16-bit (bitsandbytes, needs "
                            "CUDA): QLoRA for LLMs, and Flux.1 on 12-16 GB cards.")
    fp8_base: bool = _f(False, "Images (Flux.1): store the frozen denoiser in fp8 (e4m3) and compute in 16-bit "
                        "(diffusers' layerwise casting): half the memory of 16-bit weights, for 24 GB and smaller "
                        "cards.")
    blocks_to_swap: int = _f(0, "Images: keep this many of the denoiser's last blocks in CPU memory and stream each "
                             "onto the GPU just before it runs (kohya's name): less GPU memory for some speed. 0 = "
                             "off; the fit sets it when the card needs it.", min=0, max=200)
    noise_offset: float = _f(0.0, "Noise offset (helps very dark/bright images); 0.05-0.1 is typical.", min=0.0)
    min_snr_gamma: Optional[float] = _f(None, "Min-SNR loss weighting gamma (5 is typical); empty = off.", min=0.0)
    seed: int = _f(42, "Random seed; the same seed and config give the same run.", min=0)
    device: str = _f("auto", "Where to train.", choices=["auto", "cuda", "mps", "cpu"])
    vram_budget_gb: Optional[float] = _f(None, "Plan and fit the run for a card with this much memory (GB) instead "
                                         "of the one present, e.g. 24 to plan a 4090 run anywhere.", min=1.0)
    num_processes: int = _f(1, "Processes (one per GPU) that train together: each takes its share of every update "
                            "and the gradients are averaged, so batch_size is per GPU and the effective batch is "
                            "batch_size x gradient_accumulation_steps x num_processes. More than 1 relaunches "
                            "through accelerate (gloo on the CPU).", min=1)
    distributed: str = _f("ddp", "With num_processes > 1: ddp (each GPU holds the whole model) or fsdp (LLMs: the "
                          "frozen base is sharded over the GPUs, for models one card cannot hold).",
                          choices=["ddp", "fsdp"])

    # --- outputs ---------------------------------------------------------------------------------------------------
    output_dir: str = _f("", "Where the adapter, checkpoints, logs and config.yaml go.")
    output_name: Optional[str] = _f(None, "File name of the exported LoRA; default: the output_dir folder name.")
    save_steps: int = _f(100, "Save a checkpoint every N updates (0 = only at the end).", min=0)
    save_adapter_every: Optional[int] = _f(None, "Also export the adapter every N updates, as "
                                           "<name>-stepNNNNNN.safetensors (LLMs: a folder), to pick the best one; "
                                           "default: with every checkpoint (save_steps); 0 = the final one only.",
                                           min=0)
    checkpoints_total_limit: int = _f(3, "Keep only the newest N checkpoints.", min=1)
    resume_from: Optional[str] = _f(None, "Checkpoint folder to resume from, or 'latest' in output_dir.", path="resume")
    logging_dir: Optional[str] = _f(None, "TensorBoard log folder; default output_dir/logs.")
    sample_every_steps: int = _f(0, "Render sample outputs every N updates (0 = off).", min=0)
    sample_prompts: list[str] = _f([], "Prompts for sample images / sample replies.")
    sample_inference_steps: Optional[int] = _f(None, "Denoising steps for sample images; default: the family's "
                                               "(SD 20, Flux.1 dev 28, schnell 4).", min=1)
    export_peft_format: bool = _f(False, "Image task: also save the diffusers/peft LoRA format.")
    save_merged_model: bool = _f(False, "LLM task: also save base+adapter merged into a full model.")

    @property
    def is_image(self) -> bool:
        return self.task_type == IMAGE_TASK

    @property
    def effective_alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else float(self.lora_rank)

    @property
    def name(self) -> str:
        return self.output_name or Path(self.output_dir).name or "lora"

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer update, over all processes."""
        return self.batch_size * self.gradient_accumulation_steps * self.num_processes


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_HINTS = typing.get_type_hints(RunConfig)


def field_help(name: str) -> str:
    """Help text for a key, with its allowed values — shared by the CLI and UI tooltips."""
    meta = FIELDS[name].metadata
    text = meta["help"]
    if "choices" in meta:
        text += f" One of: {', '.join(meta['choices'])}."
    return text


def field_type(name: str) -> tuple[Any, bool]:
    """A key's value type (bool, int, float, str or list[str]) and whether it may be empty (None)."""
    hint = _HINTS[name]
    optional = type(None) in typing.get_args(hint)
    return (next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint), optional


def coerce_value(name: str, raw: Any) -> Any:
    """One value for a key, as the key's type and checked against its rules; a ConfigError says why not."""
    try:
        return _coerce(name, raw)
    except ValueError as exc:
        raise ConfigError(f"Config error: {exc}") from None


# --- loading -----------------------------------------------------------------------------------------------------

def read_yaml(path: str | Path) -> dict:
    """Parse a YAML file into a plain dict, with a clear error for syntax mistakes."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}. Give the path of a .yaml file (see presets/ for examples).")
    return parse_yaml(path.read_text(encoding="utf-8"), str(path))


def parse_yaml(text: str, where: str = "config") -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of key: value lines, got {type(data).__name__}.")
    return data


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"Unknown preset '{name}'. Available presets: {', '.join(preset_names())}.")
    return read_yaml(path)


def config_from_dict(data: dict, *, check_paths: bool = True, base_dir: Path | None = None) -> RunConfig:
    """Validate a flat mapping (user YAML, preset values already merged in) into a RunConfig.

    All problems are collected and reported in one error. Relative paths resolve against `base_dir` (default: cwd).
    """
    problems: list[str] = []
    data = dict(data)
    if data.get("preset"):
        try:
            data = {**load_preset(str(data["preset"])), **data}
        except ConfigError as exc:  # reported with the rest: the other keys are still checked
            problems.append(str(exc))
            del data["preset"]
    values, bad = _typed_values(data, problems)
    cfg = RunConfig(**values)
    later = config_checks.check_consistency(cfg) + (
        config_checks.check_paths(cfg, base_dir or Path.cwd()) if check_paths else [])
    problems += [p for p in later if not p.startswith(tuple(f"'{key}'" for key in bad))]  # said once, above
    if problems:
        raise ConfigError(_format_problems(problems))
    return cfg


def _typed_values(data: dict, problems: list[str]) -> tuple[dict[str, Any], set[str]]:
    """(the keys' typed values, the keys whose value is wrong); every unknown key and wrong value is added to
    `problems` — the run's other checks still run, so one round of fixes is enough."""
    values: dict[str, Any] = {}
    bad = set()
    for key, raw in data.items():
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else " See `python train.py --help` for the valid keys."
            problems.append(f"Unknown key '{key}'.{hint}")
            continue
        try:
            values[key] = _coerce(key, raw)
        except ValueError as exc:
            problems.append(str(exc))
            bad.add(key)
    return values, bad


def load_config(path: str | Path, overrides: dict | None = None, *, check_paths: bool = True) -> RunConfig:
    """Read, merge and validate a config file; `overrides` (e.g. CLI flags) win over the file."""
    data = read_yaml(path)
    data.update(overrides or {})
    return config_from_dict(data, check_paths=check_paths)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    return write_text_atomic(path, to_yaml(cfg))  # a full disk never leaves a truncated config.yaml


# --- validation helpers --------------------------------------------------------------------------------------------

def _format_problems(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"Config error: {problems[0]}"
    return "Config errors:\n" + "\n".join(f"  - {p}" for p in problems)


def _coerce(key: str, raw: Any) -> Any:
    """Turn a YAML value into the field's type, or raise ValueError naming key, value and what is allowed."""
    base, optional = field_type(key)
    meta = FIELDS[key].metadata
    if raw is None or (optional and raw == ""):
        if optional:
            return None
        raise ValueError(f"'{key}' needs a value ({_describe(base, meta)}).")

    value = _coerce_type(key, raw, base, meta)
    if "choices" in meta and value not in meta["choices"]:
        raise ValueError(f"'{key}' is '{value}', which is not allowed. Allowed values: {', '.join(meta['choices'])}.")
    if "min" in meta and value < meta["min"]:
        raise ValueError(f"'{key}' is {value}; it must be at least {meta['min']}.")
    if "max" in meta and value > meta["max"]:
        raise ValueError(f"'{key}' is {value}; it must be at most {meta['max']}.")
    if "pattern" in meta and not re.fullmatch(meta["pattern"][0], value):
        raise ValueError(f"'{key}' is '{value}', expected {meta['pattern'][1]}.")
    return value


def _coerce_type(key: str, raw: Any, base: Any, meta: dict) -> Any:
    bad = ValueError(f"'{key}' is {raw!r}, expected {_describe(base, meta)}.")
    if base is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in {"true", "yes", "on", "false", "no", "off"}:
            return raw.strip().lower() in {"true", "yes", "on"}
        raise bad
    if base is int:
        if isinstance(raw, bool):
            raise bad
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                raise bad from None
        raise bad
    if base is float:
        # YAML 1.1 reads `2e-4` (no dot) as a string; the user meant the number.
        if isinstance(raw, bool):
            raise bad
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise bad from None
    if base is str:
        if isinstance(raw, (dict, list)):
            raise bad
        return str(raw)
    if typing.get_origin(base) is list:
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(i, (str, int, float)) for i in items):
            raise bad
        return [str(i) for i in items]
    raise TypeError(f"unsupported schema type for {key}: {base}")


def _describe(base: Any, meta: dict) -> str:
    if "choices" in meta:
        return "one of " + ", ".join(meta["choices"])
    if "pattern" in meta:
        return meta["pattern"][1]
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
    if base in names:
        return names[base]
    return "a list of text values"
