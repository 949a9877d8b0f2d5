"""What each `network_type` is: the peft config the engines attach, and the scale of each layer's update that the
exported file must reproduce. One place for both, so training and export never disagree.

lora   LoRA on the family's target layers (conv layers only if named in target_modules)
locon  LoRA on the target layers and the UNet's conv layers (conv_rank / conv_alpha)
loha   LyCORIS LoHa: the update is the Hadamard product of two low-rank products
lokr   LyCORIS LoKr: the update is the Kronecker product of two small factors
dora   weight-decomposed LoRA: LoRA's direction, a trained magnitude per output
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from studio.config import RunConfig

LYCORIS_PRODUCTS = ("loha", "lokr")  # peft's LoHa / LoKr: no dropout on the path, no rank-stabilised scaling


@dataclass(frozen=True)
class Scaling:
    """The factor peft multiplies each layer's update by: alpha/rank (alpha/sqrt(rank) with rsLoRA), with the conv
    layers' own rank and alpha when they have them."""
    rank: int
    alpha: float
    conv_rank: int | None = None  # None: conv layers, if any, use rank / alpha
    conv_alpha: float | None = None
    rslora: bool = False

    @classmethod
    def of(cls, cfg: RunConfig) -> Scaling:
        conv_rank = _conv_rank(cfg)
        return cls(cfg.lora_rank, cfg.effective_alpha, conv_rank,
                   None if conv_rank is None else float(cfg.conv_alpha if cfg.conv_alpha is not None else conv_rank),
                   cfg.use_rslora)

    def rank_alpha(self, conv: bool) -> tuple[int, float]:
        return (self.conv_rank, self.conv_alpha) if conv and self.conv_rank else (self.rank, self.alpha)

    def factor(self, conv: bool = False) -> float:
        rank, alpha = self.rank_alpha(conv)
        return alpha / (math.sqrt(rank) if self.rslora else rank)


def adapter_config(cfg: RunConfig, targets: list[str] | str, conv_targets: tuple[str, ...] = (), **extra):
    """The peft config of `cfg.network_type` on `targets` (and `conv_targets` for locon, or when conv_rank is set);
    `extra` goes to LoraConfig (LLMs: task_type, and peft's default initialisation rather than diffusers' gaussian)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    scaling = Scaling.of(cfg)
    convs = list(conv_targets) if scaling.conv_rank else []
    patterns = {"rank_pattern": {t: scaling.conv_rank for t in convs},
                "alpha_pattern": {t: scaling.conv_alpha for t in convs}} if convs else {}
    modules = list(targets) + convs if convs else targets  # LLMs may target peft's "all-linear"
    if cfg.network_type == "loha":
        return LoHaConfig(r=cfg.lora_rank, alpha=cfg.effective_alpha, target_modules=modules, **patterns)
    if cfg.network_type == "lokr":
        return LoKrConfig(r=cfg.lora_rank, alpha=cfg.effective_alpha, target_modules=modules,
                          decompose_factor=cfg.lokr_factor, **patterns)
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.effective_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=modules, use_dora=cfg.network_type == "dora", use_rslora=cfg.use_rslora,
                      **patterns, **{"init_lora_weights": "gaussian", **extra})


def network_header(cfg: RunConfig) -> dict[str, str]:
    """kohya's header fields for a LyCORIS network. A plain LoRA keeps the family's `ss_network_module` (with rsLoRA
    too: the exported alpha already gives its scale)."""
    if cfg.network_type == "lora" and not cfg.conv_rank:
        return {}
    scaling = Scaling.of(cfg)
    args = {"algo": {"dora": "lora"}.get(cfg.network_type, cfg.network_type)}
    if cfg.network_type == "dora":
        args["dora_wd"] = "True"
    if scaling.conv_rank:
        args["conv_dim"], args["conv_alpha"] = str(scaling.conv_rank), str(scaling.conv_alpha)
    if cfg.network_type == "lokr":
        args["factor"] = str(cfg.lokr_factor)
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}


def network_problems(cfg: RunConfig, supported: tuple[str, ...], label: str) -> list[str]:
    """What of cfg's network settings the family (`supported` network types, called `label`) cannot train."""
    problems = []
    if cfg.network_type not in supported:
        problems.append(f"network_type {cfg.network_type} is not available for {label} models (use "
                        f"{' or '.join(supported)}).")
    if cfg.network_type in LYCORIS_PRODUCTS and cfg.use_rslora:
        problems.append(f"use_rslora applies to lora, locon and dora; {cfg.network_type} scales by alpha/rank. "
                        "Set use_rslora: false.")
    if cfg.init_lora and cfg.network_type != "lora":
        problems.append("init_lora continues a plain LoRA; set network_type: lora or remove init_lora.")
    return problems


def _conv_rank(cfg: RunConfig) -> int | None:
    if cfg.network_type == "locon":
        return cfg.conv_rank or cfg.lora_rank
    return cfg.conv_rank
