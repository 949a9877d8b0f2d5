"""The exported adapter's header, in the formats kohya sd-scripts writes (train_network.py, library/train_util.py,
library/sai_model_spec.py), because that is what A1111, Forge and ComfyUI read from a LoRA: the `ss_*` training
facts (the Lora tab's name comes from ss_output_name, its tag list from ss_tag_frequency), ModelSpec's
`modelspec.*` identity (Forge tells SD1 / SDXL / Flux files apart by it) and the `sshs_*` hashes (the LoRA hash
that A1111 and Forge write into image infotexts).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from studio.config import RunConfig
from studio.families import Family

MODELSPEC_VERSION = "1.0.1"  # kohya sd-scripts since August 2025
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}  # diffusers' name → ModelSpec's (flow matching: none)

# kohya's key → the config field it records, written as str() of the value like kohya ("True", "None", "0.0001").
RUN_SETTINGS = {"ss_learning_rate": "learning_rate", "ss_seed": "seed", "ss_batch_size_per_device": "batch_size",
                "ss_gradient_accumulation_steps": "gradient_accumulation_steps", "ss_lr_scheduler": "lr_scheduler",
                "ss_lr_warmup_steps": "lr_warmup_steps", "ss_max_grad_norm": "max_grad_norm",
                "ss_network_dropout": "lora_dropout", "ss_gradient_checkpointing": "gradient_checkpointing"}
IMAGE_SETTINGS = {"ss_text_encoder_lr": "text_encoder_lr", "ss_shuffle_caption": "shuffle_tags",
                  "ss_keep_tokens": "keep_tokens", "ss_flip_aug": "random_flip",
                  "ss_caption_dropout_rate": "caption_dropout", "ss_enable_bucket": "enable_bucket",
                  "ss_cache_latents": "cache_latents", "ss_noise_offset": "noise_offset",
                  "ss_min_snr_gamma": "min_snr_gamma"}


@dataclass(frozen=True)
class ImageFacts:
    """What an image run's header says beyond its config (Engine.header_facts)."""
    family: Family
    prediction_type: str | None  # the noise scheduler's, in diffusers' names
    folder: str  # the dataset folder's name: kohya's key in ss_dataset_dirs and ss_tag_frequency
    captions: list[str]  # one per image, as trained (trigger word first)
    architecture: str = ""  # ModelSpec's architecture of this base when it is not the family's (Flux.1 schnell)


def header_fields(cfg: RunConfig, image: ImageFacts | None, *, steps: int, samples: int, seconds: float,
                  finished: float) -> dict[str, str]:
    """The run's fields; `finished` is the unix time of the export, `seconds` how long this session trained."""
    fields = {
        "ss_session_id": str(secrets.randbelow(2**32)),  # tells runs apart; not drawn from the seeded `random`
        "ss_training_started_at": str(finished - seconds), "ss_training_finished_at": str(finished),
        "ss_output_name": cfg.name, "ss_sd_model_name": model_name(cfg.base_model),
        "ss_network_dim": str(cfg.lora_rank), "ss_network_alpha": str(cfg.effective_alpha), "ss_steps": str(steps),
        "ss_num_train_images": str(samples), "ss_training_time_s": f"{seconds:.1f}",
        **settings(cfg, RUN_SETTINGS), "studio_task": cfg.task_type,
        # kohya's name for batch x processes x accumulation: the samples behind each update
        "ss_total_batch_size": str(cfg.effective_batch), "studio_num_processes": str(cfg.num_processes),
    }
    return {**fields, **image_fields(cfg, image, finished)} if image else fields


def image_fields(cfg: RunConfig, image: ImageFacts, finished: float) -> dict[str, str]:
    return {
        "ss_resolution": str((cfg.resolution, cfg.resolution)), **settings(cfg, IMAGE_SETTINGS),
        "ss_dataset_dirs": json.dumps({image.folder: {"n_repeats": cfg.repeats, "img_count": len(image.captions)}}),
        "ss_tag_frequency": json.dumps({image.folder: tag_frequency(image.captions)}),
        **modelspec(image.family, title=cfg.name, side=cfg.resolution, timestamp=finished,
                    prediction_type=image.prediction_type, architecture=image.architecture),
    }


def modelspec(family: Family, *, title: str, side: int, timestamp: float,
              prediction_type: str | None, architecture: str = "") -> dict[str, str]:
    fields = {"modelspec.sai_model_spec": MODELSPEC_VERSION,
              "modelspec.architecture": f"{architecture or family.modelspec_architecture}/lora",
              "modelspec.implementation": family.modelspec_implementation, "modelspec.title": title,
              "modelspec.resolution": f"{side}x{side}",
              "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat()}
    if prediction_type in PREDICTION_TYPES:
        fields["modelspec.prediction_type"] = PREDICTION_TYPES[prediction_type]
    return fields


def settings(cfg: RunConfig, keys: dict[str, str]) -> dict[str, str]:
    return {key: str(getattr(cfg, name)) for key, name in keys.items()}


def model_name(base_model: str) -> str:
    """kohya's ss_sd_model_name: a local model's file or folder name, a hub id as given."""
    return Path(base_model).name if Path(base_model).exists() else base_model


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """Tag → count over the captions, as kohya counts them: comma-separated, stripped, lower-cased."""
    return dict(Counter(tag.strip().lower() for caption in captions for tag in caption.split(",") if tag.strip()))


def hash_fields(serialized: bytes) -> dict[str, str]:
    """kohya's sshs_* hashes of a .safetensors file's bytes: sha256 of the tensor data after the header (what
    A1111 / Forge compute as a LoRA's hash), and the additional-networks extension's legacy 8-digit hash of 64 KiB
    at 1 MiB."""
    data = memoryview(serialized)
    header_end = 8 + int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[header_end:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}
