"""Image LoRA for every registered image family (SD1.5, SDXL, Flux.1...) via diffusers + peft.

What differs between families — the denoiser, the text encoding, the noise and loss, the exported layout, the
sampling defaults — is the family's recipe (studio/families/<family>.py); this engine owns the rest: the dataset and
its buckets, the latent and text caches, LoRA attachment, checkpoints' adapter state, export and samples.

Batches hold latents and text embeddings ready for the denoiser: the VAE and frozen text encoders run once per
image / caption when caching is on (the default), so an epoch after the first is all denoiser work. With
cache_latents_to_disk they also run once across runs: the next run on the same data reads
studio.data.feature_cache's files. Which component is on the device when — text encoders only while captions and
sample prompts are encoded, the VAE while latents are cached and samples decoded, the denoiser (in its fp8 / NF4
storage, some blocks streamed with blocks_to_swap) from training on — is studio.residency's to decide and do.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from diffusers.training_utils import cast_training_params
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils._pytree import tree_map

from studio.adapters import Scaling, adapter_config, network_header
from studio.config import RunConfig
from studio.data.feature_cache import CACHE_DIR, VERSION, DiskCache, file_digest, model_fingerprint
from studio.data.images import DatasetItem, augment_caption, inspect_dataset, make_buckets, pick_bucket
from studio.data.held_out import split_held_out
from studio.engines.base import Engine, Sample
from studio.engines.image_data import ImageBatch, ImageData
from studio.engines.init_lora import read_init_lora
from studio.errors import StudioError
from studio.export.lora_file import save_lora_file
from studio.export.metadata import ImageFacts
from studio.export.selftest import check_lora
from studio.families import AUTO
from studio.hardware import storage_dtype, to_device
from studio.models.pipelines import load_pipeline
from studio.preview.images import render
from studio.residency import Residency, decide
from studio.rotary import lean_rotary_embedding



class DiffusionEngine(ImageData, Engine):
    # --- setup -------------------------------------------------------------------------------------------------------
    def load(self) -> None:
        cfg = self.cfg
        self.items: list[DatasetItem] = self._training_then_held_out()
        self.validation_batch_size = cfg.batch_size  # fixed: a back-off must not change the held-out noise draws
        self._plain_captions = [augment_caption(item.caption, random.Random(0), trigger_word=self.cfg.trigger_word)
                                for item in self.items]
        self.weight_dtype = storage_dtype(self.autocast, self.device.type)
        self.pipe, self.family = load_pipeline(cfg.base_model, allow_unsafe_pickle=cfg.allow_unsafe_pickle,
                                               torch_dtype=self.weight_dtype, components=cfg.base_components)
        if cfg.model_family not in (AUTO, self.family.name):
            raise StudioError(f"model_family is {cfg.model_family} but {cfg.base_model} is a {self.family.label} "
                              f"model ({self.family.name}). Set model_family: auto.")
        self.recipe = self.family.load_recipe()
        self.check_family_settings(self.family, self.recipe.check(cfg))
        pipe = self.pipe
        pipe.set_progress_bar_config(disable=True)
        self.denoiser = getattr(pipe, self.recipe.denoiser)
        self.text_encoders = {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2")
                              if getattr(pipe, name, None) is not None}
        for module in (self.denoiser, pipe.vae, *self.text_encoders.values()):
            module.requires_grad_(False)
        pipe.vae.to(torch.float32)  # the SD VAEs overflow in fp16; it runs once per image anyway
        self.noise_scheduler = self.recipe.noise_scheduler(pipe)
        # Everything is on the CPU now; each phase brings to the device only what it needs (studio/residency.py).
        # fp8 storage is cast here, on the CPU, before LoRA is attached: only the frozen base layers are fp8.
        self.residency = self._residency()
        # Frozen text encoders see each distinct caption once; shuffled tags make captions too varied to cache.
        self.text_cache: dict[str, tuple] | None = (
            {} if not cfg.train_text_encoder and not cfg.shuffle_tags else None)
        self.prompt_inputs: dict[str, dict] = {}  # sample prompt → the pipeline's embeddings of it (on the CPU)
        self.disk_cache = self._open_disk_cache() if cfg.cache_latents_to_disk else None
        if self.text_cache is not None:
            self._cache_all_captions()
        self._bucket_and_cache()
        self.residency.enter("train")  # the denoiser arrives in its storage format (NF4: quantized on the way)
        self._attach_lora()
        self.residency.stream_blocks()
        if cfg.init_lora:
            loaded = read_init_lora(Path(cfg.init_lora), self.adapter_state(), self.recipe.to_file, cfg)
            self.load_adapter_state(loaded)
            self.events.emit("log", message=f"Initialised LoRA from {Path(cfg.init_lora).name} ({len(loaded)} "
                                            "tensors).")
        self._log_attention()
        self._channels_last = self._convolutions_in_channels_last()
        lean_rotary_embedding()  # the denoiser's RoPE without fp32 copies (studio/rotary.py)
        if cfg.torch_compile:
            self.denoiser.compile()  # in place: parameter names, and so the LoRA keys, stay as they are


    def _training_then_held_out(self) -> list[DatasetItem]:
        """Every image, training ones first and then the held-out ones (from validation_dir or split off by
        validation_split), so all share the buckets, latent cache and caption cache; `train_count` marks the end
        of the training ones."""
        report = inspect_dataset(self.cfg.train_data_dir, self.cfg.metadata_path, max_pixels=self.cfg.max_image_pixels)
        report.raise_if_problems()
        if self.cfg.validation_dir:
            held_report = inspect_dataset(self.cfg.validation_dir, max_pixels=self.cfg.max_image_pixels)
            held_report.raise_if_problems()
            items, held = report.items, held_report.items
        else:
            items, held = split_held_out(report.items, self.cfg, "images")
        if held:
            self.events.emit("log", message=f"{len(held)} held-out image(s) for the validation loss, {len(items)} "
                                            "to train on.")
        self.train_count = len(items)
        return items + held

    def _residency(self) -> Residency:
        from studio.hardware import detect
        from studio.plan.fit import card_memory
        from studio.plan.memory import CUDA_CONTEXT_GB

        card = card_memory(self.cfg, detect()) if self.device.type == "cuda" else None
        decisions = decide(self.cfg, self.recipe.denoiser, self.text_encoders, card, CUDA_CONTEXT_GB)
        components = {self.recipe.denoiser: self.denoiser, "vae": self.pipe.vae, **self.text_encoders}
        blocks = self.recipe.swap_blocks(self.denoiser) if decisions.blocks_to_swap else None
        return Residency(components, decisions, self.device, self.autocast or self.weight_dtype, blocks,
                         log=lambda text, **where: self.events.emit("log", message=text, **where))

    @contextmanager
    def _in_phase(self, phase: str) -> Iterator[None]:
        """`phase`'s components on the device for a moment (a caption or prompt not cached yet, new latents after a
        back-off, samples), then back to the phase the run was in."""
        before = self.residency.phase
        self.residency.enter(phase)
        try:
            yield
        finally:
            if before is not None and before != phase:
                self.residency.enter(before)

    def _cache_all_captions(self) -> None:
        """Every caption a step can see and every sample prompt, encoded up front in the encode phase: the text
        encoders leave the device before the denoiser arrives."""
        captions = sorted(set(self._plain_captions) | ({""} if self.cfg.caption_dropout else set()))
        self._cached_text(captions)
        self._prompt_inputs(list(self.cfg.sample_prompts))
        self.events.emit("log", message=f"Cached {len(captions)} caption embeddings"
                         + (f" and {len(self.cfg.sample_prompts)} sample prompt(s)." if self.cfg.sample_prompts
                            else "."))

    def _prompt_inputs(self, prompts: list[str]) -> dict[str, dict]:
        """The pipeline's embeddings of each sample prompt, encoded in an encode phase when not cached yet; {} when
        the text is not cached (a trained text encoder changes them: the pipeline encodes live)."""
        if self.text_cache is None:
            return {}
        new = [p for p in dict.fromkeys(prompts) if p not in self.prompt_inputs]
        if new:
            with self._in_phase("encode"), torch.no_grad():
                for prompt in new:
                    inputs = self.recipe.prompt_inputs(self.pipe, prompt, self.residency.encode_device)
                    # tensors, or lists of them (Z-Image's per-prompt embeddings of their own lengths)
                    self.prompt_inputs[prompt] = tree_map(lambda t: t.cpu(), inputs)
        return {p: self.prompt_inputs[p] for p in prompts}

    def _attach_lora(self) -> None:
        cfg = self.cfg
        self.denoiser.add_adapter(adapter_config(cfg, self.targets, self.recipe.conv_targets))
        trained = [self.denoiser]
        if cfg.train_text_encoder:
            for encoder in self.text_encoders.values():
                encoder.add_adapter(adapter_config(cfg, list(self.recipe.text_encoder_targets)))
                trained.append(encoder)
        cast_training_params(trained, dtype=torch.float32)  # under autocast the loop trains them in the compute dtype,
        # with fp32 masters for the optimizer (studio/master_weights.py)
        self._trained = trained
        if cfg.gradient_checkpointing:
            self.enable_gradient_checkpointing()

    def _convolutions_in_channels_last(self) -> bool:
        """A conv denoiser on CUDA in channels_last (its weights here, its input in `loss`): cuDNN's fast kernels are
        NHWC, and an NCHW model pays a layout conversion around every convolution (8 % of an SD1.5 step's GPU time)."""
        if self.device.type != "cuda" or not any(isinstance(m, torch.nn.Conv2d) for m in self.denoiser.modules()):
            return False
        self.denoiser.to(memory_format=torch.channels_last)
        return True

    @property
    def targets(self) -> list[str]:
        return self.cfg.target_modules or list(self.recipe.targets)

    def _log_attention(self) -> None:
        """Which attention the denoiser runs: diffusers' plain AttnProcessor materialises the attention matrix; the
        others call PyTorch's fused SDPA kernels."""
        # from the attention modules themselves: not every denoiser lists them (Z-Image has no attn_processors)
        names = sorted({type(m.processor).__name__ for m in self.denoiser.modules() if hasattr(m, "processor")})
        slow = "AttnProcessor" in names
        self.events.emit("log", message=f"Attention: {', '.join(names)}"
                         + (" — not SDPA: slower and more memory per step." if slow else " (PyTorch SDPA)."))

    def _open_disk_cache(self) -> DiskCache:
        self._digests = [file_digest(item.path) for item in self.items]
        self._cache_id = f"v{VERSION}|{model_fingerprint(self.cfg.base_model)}|{self.device.type}"
        folder = Path(self.cfg.train_data_dir) / CACHE_DIR
        return DiskCache(folder, lambda text: self.events.emit("log", message=text))

    def enable_gradient_checkpointing(self) -> None:
        self.denoiser.enable_gradient_checkpointing()
        for encoder in self._trained[1:]:
            encoder.gradient_checkpointing_enable()

    def _bucket_and_cache(self) -> None:
        """Each image's bucket at cfg.resolution, and the latent cache for those buckets."""
        cfg = self.cfg
        step = self.recipe.bucket_step(self.pipe)
        self.side = max(step, cfg.resolution // step * step)
        buckets = make_buckets(self.side, step) if cfg.enable_bucket else [(self.side, self.side)]
        self.item_buckets = [pick_bucket(item.size, buckets) for item in self.items]
        self.latent_cache = None  # the old cache's memory is free before the new one is encoded
        if self.residency.decisions.latents_cached:
            with self._in_phase("cache"):  # the VAE alone on the device, then it leaves
                self.latent_cache = self._encode_all_latents()

    def apply_block_swap(self) -> None:
        """More of the denoiser's blocks in CPU memory (an out-of-memory back-off raised cfg.blocks_to_swap)."""
        self.residency.swap(self.cfg.blocks_to_swap, self.recipe.swap_blocks(self.denoiser))

    def apply_length(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._bucket_and_cache()

    def _lora_modules(self) -> dict[str, torch.nn.Module]:
        """Prefix → module, for the modules that carry LoRA weights (the prefixes kohya conversion expects)."""
        modules = {self.recipe.denoiser: self.denoiser}
        if self.cfg.train_text_encoder:
            modules.update(self.text_encoders)
        return modules

    # --- data --------------------------------------------------------------------------------------------------------
    # studio.engines.image_data.ImageData: buckets, augmented captions, the latent and text caches

    # --- training ----------------------------------------------------------------------------------------------------
    def loss(self, batch: ImageBatch, rng: torch.Generator) -> torch.Tensor:
        latents = to_device(batch.latents, self.device, self.weight_dtype)
        if self._channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        if batch.embeds is None:
            embeds, pooled = self._encode_text(batch.captions)
        else:
            embeds, pooled = batch.embeds, batch.pooled
        return self.recipe.loss(self, latents, embeds.to(self.device), pooled, batch.conditioning, rng)

    def validation_loss(self) -> float | None:
        with self._in_phase("validate"):
            return super().validation_loss()

    def param_groups(self) -> list[dict]:
        denoiser = [p for p in self.denoiser.parameters() if p.requires_grad]
        groups = [{"params": denoiser, "lr": self.cfg.learning_rate}]
        text = [p for m in self._trained[1:] for p in m.parameters() if p.requires_grad]
        if text:
            groups.append({"params": text, "lr": self.cfg.text_encoder_lr or self.cfg.learning_rate})
        return groups

    def trainable_modules(self) -> list[torch.nn.Module]:
        return list(self._trained)

    # --- weights -----------------------------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{key}": value for prefix, module in self._lora_modules().items()
                for key, value in get_peft_model_state_dict(module).items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, module in self._lora_modules().items():
            part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            result = set_peft_model_state_dict(module, part)
            if getattr(result, "unexpected_keys", None):
                raise StudioError(f"Adapter weights do not fit {prefix}: unexpected {result.unexpected_keys[:3]}.")

    def export(self, out_dir: Path, metadata: dict[str, str], name: str | None = None) -> list[Path]:
        with self._in_phase("save"):
            return self._export(out_dir, metadata, name)

    def _export(self, out_dir: Path, metadata: dict[str, str], name: str | None) -> list[Path]:
        file = out_dir / f"{name or self.cfg.name}.safetensors"
        tensors = self.recipe.to_file(self.adapter_state(), Scaling.of(self.cfg))
        test = check_lora(tensors, self.pipe, self.family)
        self.events.emit("selftest", message=f"Export self-test of {file.name}: {test.summary()}" if test.ok else
                         f"WARNING: {file.name} would not load completely: {test.summary()}",
                         ok=test.ok, problems=test.problems)
        main = save_lora_file(file, tensors, {**metadata, "studio_selftest": test.summary()})
        files = [main]
        if self.cfg.export_peft_format and name is None:
            # peft's own keys with each LoraConfig in the header: diffusers injects every layer as trained and reads
            # alpha from the config (without it, alpha = rank and the strength is off).
            parts = {}
            for prefix, module in self._lora_modules().items():
                parts[f"{prefix}_lora_layers"] = get_peft_model_state_dict(module)
                parts[f"{prefix}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
            type(self.pipe).save_lora_weights(out_dir / "diffusers", **parts)
            files.append(out_dir / "diffusers" / "pytorch_lora_weights.safetensors")
        return files

    def sample(self, prompts: list[str], out_dir: Path, step: int) -> list[Sample]:
        out_dir.mkdir(parents=True, exist_ok=True)
        samples = []
        inputs = self._prompt_inputs(prompts)
        for i, prompt in enumerate(prompts):
            embeds = tree_map(lambda t: t.to(self.device), inputs[prompt]) if prompt in inputs else None
            with self._in_phase("sample"), torch.autocast(self.device.type, dtype=self.autocast,
                                                          enabled=self.autocast is not None):
                image = render(self.pipe, prompt, seed=self.cfg.seed + i, steps=self.cfg.sample_inference_steps,
                               width=self.side, height=self.side, embeds=embeds)
            path = out_dir / f"step-{step:06d}-{i}.png"
            image.save(path)
            samples.append(Sample(prompt, image_path=path))
        return samples

    def describe(self) -> dict[str, str]:
        return {"ss_base_model_version": self.family.webui_version, "ss_network_module": self.family.network_module,
                "studio_model_family": self.family.name, "studio_target_modules": ",".join(self.targets),
                **network_header(self.cfg)}

    def header_facts(self) -> ImageFacts:
        variant = getattr(self.recipe, "modelspec_architecture", None)  # a family whose models differ (schnell)
        return ImageFacts(self.family, self.noise_scheduler.config.get("prediction_type"),
                          Path(self.cfg.train_data_dir).name, self._plain_captions[:self.train_count],
                          variant(self.pipe) if variant else "")
