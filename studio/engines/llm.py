"""Causal LM chat LoRA / QLoRA (Llama, Qwen, Mistral, ...) via transformers + peft, optionally 4-bit bitsandbytes.

The data is tokenized once at load (studio.data.text_tokens): every batch is ready token ids, labels (assistant tokens
only by default) and positions. The loop does the rest (precision, accumulation, checkpoints, resume).

Outputs: `output_dir/<name>/` is a peft adapter folder (adapter_model.safetensors, adapter_config.json, tokenizer
files) that `PeftModel.from_pretrained(base, folder)` loads; with save_merged_model, `output_dir/<name>-merged/` is
the base model with the adapter merged in, a plain transformers folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from studio.adapters import adapter_config
from studio.config import RunConfig
from studio.data.text import IGNORE, Record, raise_problems, read_dataset
from studio.data.text_tokens import Example, collate, ensure_chat_template, pack, tokenize_records
from studio.engines import packed_attention
from studio.data.held_out import split_held_out
from studio.engines.base import Engine, Sample
from studio.models.causal_lm import load_causal_lm, load_tokenizer, pad_token_id
from studio.errors import StudioError
from studio.export.peft_merge import ADAPTER_CONFIG, ADAPTER_WEIGHTS, merge_adapter, save_adapter
from studio.families import get_family
from studio.fused_kernels import apply_fused_kernels
from studio.hardware import storage_dtype, to_device
from studio.activation_offload import use_offloaded_checkpointing
from studio.llm_loss import causal_lm_loss, labelled_positions, why_not_chunked
from studio.preview.chat import generate_reply

ALL_LINEAR = "all-linear"
# Non-reentrant checkpointing works with frozen inputs (no enable_input_require_grads needed).
CHECKPOINTING = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
LABELLED = "labelled"  # a collated batch's labelled_positions (studio/llm_loss.py), found on the host


class LLMEngine(Engine):
    packed_segments = False  # packed rows attended sample by sample: the engine finds the samples (Segments)

    # --- setup -------------------------------------------------------------------------------------------------------
    def load(self) -> None:
        cfg = self.cfg
        self.check_family_settings(get_family("llm"))
        # Before the model loads: a broken dataset fails in a second, not minutes.
        self.records, self.held_out_records = self._training_and_held_out()
        self.tokenizer = load_tokenizer(cfg.base_model)
        if ensure_chat_template(self.tokenizer):
            self.events.emit("log", message=f"{cfg.base_model} has no chat template; using the default "
                                            "<|role|> template (saved with the adapter).")
        self._tokenize_all()
        self.model = self._load_model()
        if cfg.init_lora:
            self._load_init_lora(Path(cfg.init_lora))

    def _training_and_held_out(self) -> tuple[list[Record], list[Record]]:
        """The training records and the held-out ones (validation_dir, or split off by validation_split)."""
        cfg = self.cfg
        report = read_dataset(cfg.train_data_dir, cfg.data_format, cfg.system_prompt)
        report.raise_if_problems()
        if cfg.validation_dir:
            held_report = read_dataset(cfg.validation_dir, cfg.data_format, cfg.system_prompt)
            held_report.raise_if_problems()
            return report.records, held_report.records
        return split_held_out(report.records, cfg, "samples")

    def _tokenize_all(self) -> None:
        self.examples = self._tokenize(self.records, self.cfg.train_data_dir)
        self.held_out = self._tokenize(self.held_out_records, self.cfg.validation_dir or "the held-out samples",
                                       held_out=True) if self.held_out_records else []

    def _tokenize(self, records: list[Record], where: str, held_out: bool = False) -> list[Example]:
        cfg = self.cfg
        data = tokenize_records(records, self.tokenizer, cfg.max_length, cfg.train_on_prompt)
        raise_problems(data.problems)
        if not data.examples:
            raise_problems([f"{where}: no sample has answer tokens within max_length={cfg.max_length}."
                            " Raise max_length."])
        summary = data.summary(cfg.max_length)
        if summary:
            self.events.emit("log", message=summary, truncated=data.truncated, split=data.split,
                             dropped=data.dropped)
        examples = pack(data.examples, cfg.max_length) if cfg.packing else data.examples
        tokens = sum(len(e) for e in examples)
        counts = {"samples": len(data.examples), "rows": len(examples), "tokens": tokens}
        what = "held-out samples" if held_out else "samples"
        self.events.emit("log", message=f"{len(data.examples)} {what}, {tokens} tokens"
                         + (f", packed into {len(examples)} rows of <= {cfg.max_length}" if cfg.packing else "") + ".",
                         **({"held_out": counts} if held_out else counts))  # the top-level counts: training only
        return examples

    def _load_model(self) -> PeftModel:
        cfg = self.cfg
        dtype = storage_dtype(self.autocast, self.device.type)
        model = load_causal_lm(cfg.base_model, dtype=dtype, device=self.device, load_in_4bit=cfg.load_in_4bit,
                               compute_dtype=self.autocast or torch.bfloat16)
        # Not peft's prepare_model_for_kbit_training: it upcasts every unquantized weight to fp32 on the card, so
        # the 8B's 128k-row embedding tables each asked 1.96 GiB at load (the 8 GB card's out-of-memory), and fp32
        # norm weights turn the whole residual stream fp32 (fp32 weight × 16-bit input), doubling every
        # checkpointed layer input. Those weights stay at the storage dtype, as in a 16-bit LoRA run (the norms
        # compute in fp32 inside either way); get_peft_model freezes the base.
        if cfg.gradient_checkpointing:
            self._checkpoint(model)
        if cfg.packing:
            self._attend_samples_apart(model)
        self.target_modules = target_modules(model, cfg.target_modules)
        lora = adapter_config(cfg, self.target_modules, task_type="CAUSAL_LM", init_lora_weights=True)
        try:
            model = get_peft_model(model, lora)  # LoRA weights stay fp32 whatever the base dtype (peft's default)
        except ValueError as exc:
            raise StudioError(f"Cannot attach LoRA: {exc}. Set target_modules to module names of this model, or "
                              f"[{ALL_LINEAR}].") from None
        self.own_loss_because = why_not_chunked(model.get_base_model())
        if self.own_loss_because:
            self.events.emit("log", message=f"Loss over the full logits: {self.own_loss_because}.")
        fused = apply_fused_kernels(model.get_base_model(), self.device)  # CUDA: liger's RMSNorm, SwiGLU, RoPE
        if fused:
            self.events.emit("log", message=fused)
        if cfg.torch_compile:
            # The decoder (the loss runs it, and the LM head in chunks), in place: the adapter's keys stay as they are.
            model.get_base_model().get_decoder().compile()
        return model

    def _attend_samples_apart(self, model) -> None:
        """Packed rows: attention per sample (studio.engines.packed_attention) instead of a row-sized mask."""
        name = packed_attention.choose(model.config, self.device)
        if name:
            model.set_attn_implementation(name)  # a model that cannot switch keeps its own (and says so)
        self.packed_segments = model.config._attn_implementation in (packed_attention.GROUPED, packed_attention.VARLEN)
        self.events.emit("log", message=f"Attention for packed rows: {model.config._attn_implementation}.")

    def enable_gradient_checkpointing(self) -> None:
        self._checkpoint(self.model)

    def _checkpoint(self, model) -> None:
        model.gradient_checkpointing_enable(**CHECKPOINTING)  # a peft model passes it to the base model
        if self.cfg.offload_activations:
            use_offloaded_checkpointing(model)

    def apply_length(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._tokenize_all()

    def _load_init_lora(self, path: Path) -> None:
        """Start from an existing peft adapter (its folder or adapter_model.safetensors) trained with this shape."""
        file = path / ADAPTER_WEIGHTS if path.is_dir() else path
        if file.suffix != ".safetensors" or not file.is_file():
            raise StudioError(f"init_lora {path} must be a peft adapter folder (with {ADAPTER_WEIGHTS}) or that "
                              ".safetensors file.")
        theirs, ours = load_file(str(file)), self.adapter_state()
        missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        if missing or extra:
            example = (missing or extra)[0]
            raise StudioError(f"init_lora {file.name} was trained on other modules than this run "
                              f"({len(missing)} missing, {len(extra)} unexpected weights, e.g. {example}). Use "
                              "the target_modules it was trained with.")
        for key, weight in theirs.items():
            if weight.shape != ours[key].shape:
                rank = weight.shape[0] if ".lora_A." in key else weight.shape[1]
                raise StudioError(f"init_lora {file.name} has rank {rank}; this run has lora_rank "
                                  f"{self.cfg.lora_rank}. Set lora_rank: {rank}.")
        their_scale = _their_scale(file.parent / ADAPTER_CONFIG)
        factor = their_scale / (self.cfg.effective_alpha / self.cfg.lora_rank) if their_scale else 1.0
        if factor != 1.0:
            # Fold the file's alpha/rank into lora_B so the adapter's effect is unchanged under this run's alpha.
            theirs = {k: v * factor if ".lora_B." in k else v for k, v in theirs.items()}
        self.load_adapter_state(theirs)
        self.events.emit("log", message=f"Initialised LoRA from {file} ({len(theirs)} tensors).")

    # --- data --------------------------------------------------------------------------------------------------------
    def num_samples(self) -> int:
        return len(self.examples)

    def batches(self, epoch: int, size: int) -> list[list[int]]:
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(
            self.cfg.seed * 100_003 + epoch)).tolist()
        return [order[i:i + size] for i in range(0, len(order), size)]

    def collate(self, indices: list[int], epoch: int) -> dict:
        return self._found_on_host(collate([self.examples[i] for i in indices], pad_token_id(self.tokenizer)))

    def held_out_batches(self) -> Iterator[tuple[dict, int]]:
        for start in range(0, len(self.held_out), self.cfg.batch_size):
            batch = collate(self.held_out[start:start + self.cfg.batch_size], pad_token_id(self.tokenizer))
            tokens = int((batch["labels"][:, 1:] != IGNORE).sum())  # the loss is a mean over these
            yield self._found_on_host(batch), tokens

    def _found_on_host(self, batch: dict[str, torch.Tensor]) -> dict:
        """What hangs on the values of the labels and positions, found here where collate made them: on a GPU each
        would wait for all the queued work (so a forward and backward wait for nothing)."""
        if not self.own_loss_because:  # the model's own loss (FSDP, transformed logits) picks no positions
            batch[LABELLED] = labelled_positions(batch["labels"])
        if self.packed_segments:
            # transformers hands it on to every attention layer
            batch[packed_attention.SEGMENTS] = packed_attention.Segments.of(batch["position_ids"])
        return batch

    # --- training ----------------------------------------------------------------------------------------------------
    def loss(self, host: dict, rng: torch.Generator) -> torch.Tensor:
        batch = {k: v.to(self.device) if isinstance(v, packed_attention.Segments) else to_device(v, self.device)
                 for k, v in host.items() if k != LABELLED}
        if self.own_loss_because:
            # use_cache=False: no KV cache in training (and a cache would turn off the packed-sequence masking).
            return self.model(**batch, use_cache=False).loss
        labelled = [to_device(t, self.device) for t in host[LABELLED]]
        return causal_lm_loss(self.model, batch, labelled=labelled)  # never all positions' logits at once

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.cfg.learning_rate}]

    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.model]

    # --- weights -----------------------------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        return get_peft_model_state_dict(self.model)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        result = set_peft_model_state_dict(self.model, state)
        if result.unexpected_keys:
            raise StudioError(f"Adapter weights do not fit this model: unexpected {result.unexpected_keys[:3]}.")

    def export(self, out_dir: Path, metadata: dict[str, str], name: str | None = None) -> list[Path]:
        adapter = save_adapter(self.model, self.tokenizer, out_dir / (name or self.cfg.name), metadata)
        files = [adapter]
        if self.cfg.save_merged_model and name is None:
            self.events.emit("log", message="Merging the adapter into the base model...")
            files.append(merge_adapter(adapter, out_dir / f"{self.cfg.name}-merged", base_model=self.cfg.base_model))
        return files

    def sample(self, prompts: list[str], out_dir: Path, step: int) -> list[Sample]:
        samples = []
        for prompt in prompts:
            system = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                reply = generate_reply(self.model, self.tokenizer, system + [{"role": "user", "content": prompt}])
            samples.append(Sample(prompt, text=reply))
        return samples

    def describe(self) -> dict[str, str]:
        targets = self.target_modules if isinstance(self.target_modules, str) else ",".join(self.target_modules)
        return {"studio_model_type": self.model.config.model_type, "studio_target_modules": targets,
                "studio_load_in_4bit": str(self.cfg.load_in_4bit).lower()}


def target_modules(model: torch.nn.Module, requested: list[str] | None) -> list[str] | str:
    """The modules LoRA adapts: the config's list, peft's 'all-linear', or by default the attention projections.

    The default is found from the model itself (the linear layers inside each attention block: q/k/v/o_proj in
    Llama, Qwen and Mistral; qkv_proj/o_proj in Phi-3; c_attn/c_proj in GPT-2), so any architecture works.
    """
    if requested == [ALL_LINEAR]:
        return ALL_LINEAR
    if requested:
        return list(requested)
    names = set()
    for module in model.modules():
        if "attention" in type(module).__name__.lower():
            names |= {name for name, child in module.named_children() if isinstance(child, (torch.nn.Linear, Conv1D))}
    if not names:
        raise StudioError(f"Could not find the attention projections of this {model.config.model_type} model. Set "
                          f"target_modules to their names, or [{ALL_LINEAR}].")
    return sorted(names)


def _their_scale(config_path: Path) -> float | None:
    """alpha/rank of an adapter from its adapter_config.json, or None without one."""
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    return float(config["lora_alpha"]) / float(config["r"])
