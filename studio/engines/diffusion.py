"""Stable Diffusion (SD1.5 / SDXL) UNet LoRA, optionally text-encoder LoRA, via diffusers + peft.

Batches hold latents and text embeddings ready for the UNet: the VAE and frozen text encoders run once per image /
caption when caching is on (the default), so an epoch after the first is all UNet work. With cache_latents_to_disk
they also run once across runs: the next run on the same data reads studio.data.feature_cache's files.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import cast_training_params, compute_snr
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from studio.config import RunConfig
from studio.data.feature_cache import CACHE_DIR, VERSION, DiskCache, Features, file_digest, model_fingerprint
from studio.data.images import (DatasetItem, augment_caption, bucket_batches, inspect_dataset, load_pixels,
                                make_buckets, pick_bucket)
from studio.engines.base import Engine, Sample
from studio.models.pipelines import load_sd_pipeline
from studio.errors import StudioError
from studio.export.kohya import save_kohya_lora, to_kohya
from studio.hardware import storage_dtype, to_device
from studio.preview.images import render

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class ImageBatch:
    latents: torch.Tensor  # (B, 4, h, w), already scaled by the VAE's scaling factor
    captions: list[str]
    embeds: torch.Tensor | None  # cached text embeddings, or None when the text encoder trains
    pooled: torch.Tensor | None  # SDXL only
    time_ids: torch.Tensor | None  # SDXL only: original size, crop, target size per sample


class DiffusionEngine(Engine):
    # --- setup -------------------------------------------------------------------------------------------------------
    def load(self) -> None:
        cfg = self.cfg
        report = inspect_dataset(cfg.train_data_dir, cfg.metadata_path)
        report.raise_if_problems()
        self.items: list[DatasetItem] = report.items
        self._plain_captions = [augment_caption(item.caption, random.Random(0), trigger_word=self.cfg.trigger_word)
                                for item in self.items]
        self.weight_dtype = storage_dtype(self.autocast, self.device.type)  # LoRA: fp32 (cast_training_params)
        self.pipe, self.family = load_sd_pipeline(cfg.base_model, allow_unsafe_pickle=cfg.allow_unsafe_pickle,
                                                  torch_dtype=self.weight_dtype)
        if cfg.model_family not in ("auto", self.family):
            raise StudioError(f"model_family is {cfg.model_family} but {cfg.base_model} is a {self.family} model. "
                              "Set model_family: auto.")
        pipe = self.pipe
        pipe.set_progress_bar_config(disable=True)
        self.text_encoders = {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2")
                              if getattr(pipe, name, None) is not None}
        for module in (pipe.unet, pipe.vae, *self.text_encoders.values()):
            module.requires_grad_(False)
        pipe.to(self.device)
        pipe.vae.to(torch.float32)  # the SD VAEs overflow in fp16; it runs once per image anyway
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self._attach_lora()
        if cfg.init_lora:
            self._load_init_lora(Path(cfg.init_lora))
        self._log_attention()
        if cfg.torch_compile:
            pipe.unet.compile()  # in place: parameter names, and so the LoRA keys, stay as they are

        self.disk_cache = self._open_disk_cache() if cfg.cache_latents_to_disk else None
        self._bucket_and_cache()
        # Frozen text encoders see each distinct caption once; shuffled tags make captions too varied to cache.
        self.text_cache: dict[str, tuple] | None = (
            {} if not cfg.train_text_encoder and not cfg.shuffle_tags else None)

    def _attach_lora(self) -> None:
        cfg = self.cfg
        common = dict(r=cfg.lora_rank, lora_alpha=cfg.effective_alpha, lora_dropout=cfg.lora_dropout,
                      init_lora_weights="gaussian")
        self.pipe.unet.add_adapter(LoraConfig(target_modules=cfg.target_modules or UNET_TARGETS, **common))
        trained = [self.pipe.unet]
        if cfg.train_text_encoder:
            for encoder in self.text_encoders.values():
                encoder.add_adapter(LoraConfig(target_modules=TEXT_ENCODER_TARGETS, **common))
                trained.append(encoder)
        cast_training_params(trained, dtype=torch.float32)
        self._trained = trained
        if cfg.gradient_checkpointing:
            self.enable_gradient_checkpointing()

    def _log_attention(self) -> None:
        """Which attention the UNet runs: diffusers' *2_0 processors call PyTorch's fused SDPA kernels."""
        names = sorted({type(p).__name__ for p in self.pipe.unet.attn_processors.values()})
        fused = all(name.endswith("2_0") for name in names)
        self.events.emit("log", message=f"UNet attention: {', '.join(names)}"
                         + (" (PyTorch SDPA)." if fused else " — not SDPA: slower and more memory per step."))

    def _open_disk_cache(self) -> DiskCache:
        self._digests = [file_digest(item.path) for item in self.items]
        self._cache_id = f"v{VERSION}|{model_fingerprint(self.cfg.base_model)}|{self.device.type}"
        folder = Path(self.cfg.train_data_dir) / CACHE_DIR
        return DiskCache(folder, lambda text: self.events.emit("log", message=text))

    def enable_gradient_checkpointing(self) -> None:
        self.pipe.unet.enable_gradient_checkpointing()
        for encoder in self._trained[1:]:
            encoder.gradient_checkpointing_enable()

    def _bucket_and_cache(self) -> None:
        """Each image's bucket at cfg.resolution, and the latent cache for those buckets."""
        cfg, pipe = self.cfg, self.pipe
        # Bucket sides must survive the VAE (x8) and the UNet's downsampling (x2 per extra level).
        step = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        self.side = max(step, cfg.resolution // step * step)
        buckets = make_buckets(self.side, step) if cfg.enable_bucket else [(self.side, self.side)]
        self.item_buckets = [pick_bucket(item.size, buckets) for item in self.items]
        self.latent_cache = None  # the old cache's memory is free before the new one is encoded
        self.latent_cache = self._encode_all_latents() if cfg.cache_latents and not cfg.random_flip else None

    def apply_length(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._bucket_and_cache()

    def _lora_modules(self) -> dict[str, torch.nn.Module]:
        """Prefix → module, for the modules that carry LoRA weights (the prefixes kohya conversion expects)."""
        modules = {"unet": self.pipe.unet}
        if self.cfg.train_text_encoder:
            modules.update(self.text_encoders)
        return modules

    def _load_init_lora(self, path: Path) -> None:
        """Start from an existing kohya-format LoRA: map its keys onto ours by converting our keys the same way."""
        if path.suffix != ".safetensors":
            raise StudioError(f"init_lora {path} must be a .safetensors LoRA file.")
        theirs = load_file(str(path))
        ours = self.adapter_state()
        kohya_of = _kohya_names(ours, self.cfg.effective_alpha, self.family)
        extra = sorted({k.split(".")[0] for k in theirs} - {k.split(".")[0] for k in kohya_of.values()})
        if extra:
            raise StudioError(f"init_lora {path.name} has LoRA weights for {len(extra)} module(s) this run does not "
                              f"train (e.g. {extra[0]}). Use the target_modules / train_text_encoder it was "
                              "trained with.")
        loaded, missing = {}, []
        for peft_key, kohya_key in kohya_of.items():
            if kohya_key not in theirs:
                missing.append(kohya_key)
                continue
            weight = theirs[kohya_key]
            if weight.shape != ours[peft_key].shape:
                rank = weight.shape[0] if ".lora_down." in kohya_key else weight.shape[1]
                raise StudioError(f"init_lora {path.name}: {kohya_key} has shape {tuple(weight.shape)}, this run "
                                  f"expects {tuple(ours[peft_key].shape)}. Set lora_rank to the file's rank "
                                  f"({rank}).")
            # Fold the file's alpha/rank into lora_up so the product matches under this run's alpha/rank.
            if ".lora_up." in kohya_key:
                base = kohya_key.split(".")[0]
                rank = weight.shape[1]
                their_scale = float(theirs.get(f"{base}.alpha", torch.tensor(rank))) / rank
                weight = weight * (their_scale / (self.cfg.effective_alpha / self.cfg.lora_rank))
            loaded[peft_key] = weight
        if missing:
            raise StudioError(f"init_lora {path.name} lacks {len(missing)} of this run's LoRA weights (e.g. "
                              f"{missing[0]}). Train with the same target_modules/train_text_encoder as that LoRA.")
        self.load_adapter_state(loaded)
        self.events.emit("log", message=f"Initialised LoRA from {path.name} ({len(loaded)} tensors).")

    def _encode_all_latents(self) -> list[torch.Tensor]:
        started = time.time()
        latents = [self._encode_latents([i], flips=[False])[0].cpu() for i in range(len(self.items))]
        read = f", {self.disk_cache.hits} read from {self.disk_cache.folder}" if self.disk_cache else ""
        self.events.emit("log", message=f"Cached {len(latents)} latents in {time.time() - started:.1f}s{read}.")
        return latents

    # --- data --------------------------------------------------------------------------------------------------------
    def num_samples(self) -> int:
        return len(self.items) * self.cfg.repeats

    def batches(self, epoch: int, size: int) -> list[list[int]]:
        buckets = [self.item_buckets[s % len(self.items)] for s in range(self.num_samples())]
        return bucket_batches(buckets, size, seed=self.cfg.seed * 100_003 + epoch)

    def collate(self, indices: list[int], epoch: int) -> ImageBatch:
        cfg = self.cfg
        randomised = cfg.shuffle_tags or cfg.caption_dropout or cfg.random_flip
        items, captions, flips = [], [], []
        for index in indices:
            items.append(index % len(self.items))
            if not randomised:
                captions.append(self._plain_captions[items[-1]])
                flips.append(False)
                continue
            rng = random.Random(f"{cfg.seed}/{epoch}/{index}")  # same draws for a sample whenever it is replayed
            captions.append(augment_caption(self.items[items[-1]].caption, rng, trigger_word=cfg.trigger_word,
                                            shuffle_tags=cfg.shuffle_tags, keep_tokens=cfg.keep_tokens,
                                            caption_dropout=cfg.caption_dropout))
            flips.append(cfg.random_flip and rng.random() < 0.5)
        if self.latent_cache is not None:
            latents = torch.stack([self.latent_cache[i] for i in items])
        else:
            latents = self._encode_latents(items, flips)
        embeds = pooled = None
        if self.text_cache is not None:
            embeds, pooled = self._cached_text(captions)
        time_ids = self._time_ids(items) if self.family == "sdxl" else None
        return ImageBatch(latents, captions, embeds, pooled, time_ids)

    def _encode_latents(self, items: list[int], flips: list[bool]) -> torch.Tensor:
        if self.disk_cache is None:
            return self._vae_encode(items, flips)
        def encode(positions: list[int]) -> list[Features]:
            latents = self._vae_encode([items[p] for p in positions], [flips[p] for p in positions])
            return [{"latents": latent.cpu()} for latent in latents]

        keys = [f"latents|{self._cache_id}|{self._digests[i]}|{self.item_buckets[i]}|flip={flip}"
                for i, flip in zip(items, flips)]
        return torch.stack([features["latents"] for features in self.disk_cache.fetch(keys, encode)])

    @torch.no_grad()
    def _vae_encode(self, items: list[int], flips: list[bool]) -> torch.Tensor:
        bucket = self.item_buckets[items[0]]
        pixels = torch.stack([load_pixels(self.items[i].path, bucket, flip)[0] for i, flip in zip(items, flips)])
        vae = self.pipe.vae
        # The distribution's mean, not a sample: deterministic, and identical with or without the cache.
        latents = vae.encode(pixels.to(self.device, torch.float32)).latent_dist.mean
        return latents * vae.config.scaling_factor

    def _time_ids(self, items: list[int]) -> torch.Tensor:
        """SDXL's size conditioning: (original h, w, crop top, left, target h, w) per sample."""
        rows = []
        for i in items:
            width, height = self.item_buckets[i]
            scale = max(width / self.items[i].size[0], height / self.items[i].size[1])
            orig_w, orig_h = round(self.items[i].size[0] * scale), round(self.items[i].size[1] * scale)
            rows.append([orig_h, orig_w, (orig_h - height) // 2, (orig_w - width) // 2, height, width])
        return torch.tensor(rows, dtype=torch.float32)

    def _encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """diffusers' own prompt encoding (penultimate layers, pooled output for SDXL)."""
        out = self.pipe.encode_prompt(prompt=captions, device=self.device, num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)
        return (out[0], out[2]) if self.family == "sdxl" else (out[0], None)

    @torch.no_grad()
    def _cached_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        new = sorted({c for c in captions if c not in self.text_cache})
        for caption, features in zip(new, self._text_features(new) if new else []):
            self.text_cache[caption] = (features["embeds"].to(self.device),
                                        features["pooled"].to(self.device) if "pooled" in features else None)
        embeds = torch.stack([self.text_cache[c][0] for c in captions])
        pooled = torch.stack([self.text_cache[c][1] for c in captions]) if self.family == "sdxl" else None
        return embeds, pooled

    def _text_features(self, captions: list[str]) -> list[Features]:
        def encode(positions: list[int]) -> list[Features]:
            embeds, pooled = self._encode_text([captions[p] for p in positions])
            return [{"embeds": embeds[i], **({"pooled": pooled[i]} if pooled is not None else {})}
                    for i in range(len(positions))]

        if self.disk_cache is None:
            return encode(list(range(len(captions))))
        keys = [f"text|{self._cache_id}|{self.family}|{self.weight_dtype}|{caption}" for caption in captions]
        return self.disk_cache.fetch(keys, encode)

    # --- training ----------------------------------------------------------------------------------------------------
    def loss(self, batch: ImageBatch, rng: torch.Generator) -> torch.Tensor:
        latents = to_device(batch.latents, self.device, self.weight_dtype)
        bsz = latents.shape[0]
        noise = to_device(torch.randn(latents.shape, generator=rng), self.device, latents.dtype)
        if self.cfg.noise_offset:
            # Shifts each channel's mean so the model learns to change overall brightness.
            offset = torch.randn((bsz, latents.shape[1], 1, 1), generator=rng)
            noise = noise + self.cfg.noise_offset * offset.to(self.device, latents.dtype)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), generator=rng)
        timesteps = to_device(timesteps, self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)

        if batch.embeds is None:
            embeds, pooled = self._encode_text(batch.captions)
        else:
            embeds, pooled = batch.embeds, batch.pooled
        extra = {}
        if self.family == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": pooled.to(self.device),
                                          "time_ids": to_device(batch.time_ids, self.device, embeds.dtype)}
        pred = self.pipe.unet(noisy, timesteps, embeds.to(self.device), **extra).sample

        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise StudioError(f"The scheduler's prediction_type '{prediction_type}' is not supported for training "
                              "(epsilon or v_prediction).")
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.cfg.min_snr_gamma:
            # Min-SNR weighting (Hang et al. 2023): stop easy, low-noise steps from dominating the loss.
            snr = compute_snr(self.noise_scheduler, timesteps)
            weight = snr.clamp(max=self.cfg.min_snr_gamma)
            per_sample = per_sample * (weight / (snr + 1 if prediction_type == "v_prediction" else snr))
        return per_sample.mean()

    def param_groups(self) -> list[dict]:
        unet = [p for p in self.pipe.unet.parameters() if p.requires_grad]
        groups = [{"params": unet, "lr": self.cfg.learning_rate}]
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

    def export(self, out_dir: Path, metadata: dict[str, str]) -> list[Path]:
        main = save_kohya_lora(out_dir / f"{self.cfg.name}.safetensors", self.adapter_state(),
                               self.cfg.effective_alpha, self.family, metadata)
        files = [main]
        if self.cfg.export_peft_format:
            layers = {f"{prefix}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
                      for prefix, module in self._lora_modules().items()}
            type(self.pipe).save_lora_weights(out_dir / "diffusers", **layers)
            files.append(out_dir / "diffusers" / "pytorch_lora_weights.safetensors")
        return files

    def sample(self, prompts: list[str], out_dir: Path, step: int) -> list[Sample]:
        out_dir.mkdir(parents=True, exist_ok=True)
        samples = []
        for i, prompt in enumerate(prompts):
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                image = render(self.pipe, prompt, seed=self.cfg.seed + i, steps=self.cfg.sample_inference_steps,
                               width=self.side, height=self.side)
            path = out_dir / f"step-{step:06d}-{i}.png"
            image.save(path)
            samples.append(Sample(prompt, image_path=path))
        return samples

    def describe(self) -> dict[str, str]:
        return {"ss_base_model_version": self.family, "ss_network_module": "networks.lora",
                "studio_target_modules": ",".join(self.cfg.target_modules or UNET_TARGETS)}


def _kohya_names(peft_state: dict[str, torch.Tensor], alpha: float, family: str) -> dict[str, str]:
    """peft key → kohya key, found by running the real conversion on tensors tagged with their index."""
    keys = list(peft_state)
    tagged = {k: torch.full((1, 1), float(i)) for i, k in enumerate(keys)}
    converted = to_kohya(tagged, alpha, family)
    return {keys[int(v.item())]: k for k, v in converted.items() if not k.endswith(".alpha")}
