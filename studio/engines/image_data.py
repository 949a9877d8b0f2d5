"""The image engine's data side: which images form a batch, their augmented captions, and the latents and text
embeddings the denoiser reads — encoded once and cached (in memory, and on disk with cache_latents_to_disk) when
the run allows it. The VAE and text encoders run inside residency phases the engine opens (`_in_phase`)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from studio.data.feature_cache import Features
from studio.data.images import augment_caption, bucket_batches, load_pixels

ENCODE_CHUNK = 16  # captions encoded at once: bounds the text encoders' activations, whatever the dataset's size


@dataclass
class ImageBatch:
    latents: torch.Tensor  # (B, C, h, w), shifted and scaled as the VAE's config says
    captions: list[str]
    embeds: torch.Tensor | None  # cached text embeddings, or None when the text encoder trains
    pooled: torch.Tensor | None  # families with a pooled text embedding (SDXL, Flux.1)
    conditioning: torch.Tensor | None  # per-sample size conditioning (SDXL's time ids)


class ImageData:
    """Mixed into DiffusionEngine, whose `load` sets the attributes read here (items, buckets, caches, recipe)."""

    def _encode_all_latents(self) -> list[torch.Tensor]:
        started = time.time()
        latents = [self._encode_latents([i], flips=[False])[0].cpu() for i in range(len(self.items))]
        read = f", {self.disk_cache.hits} read from {self.disk_cache.folder}" if self.disk_cache else ""
        self.events.emit("log", message=f"Cached {len(latents)} latents in {time.time() - started:.1f}s{read}.")
        return latents

    def num_samples(self) -> int:
        return self.train_count * self.cfg.repeats

    def batches(self, epoch: int, size: int) -> list[list[int]]:
        buckets = [self.item_buckets[s % self.train_count] for s in range(self.num_samples())]
        return bucket_batches(buckets, size, seed=self.cfg.seed * 100_003 + epoch)

    def held_out_batches(self) -> Iterator[tuple[ImageBatch, int]]:
        held = range(self.train_count, len(self.items))
        for group in bucket_batches([self.item_buckets[i] for i in held], self.validation_batch_size, self.cfg.seed):
            items = [held[i] for i in group]
            yield self._image_batch(items, [self._plain_captions[i] for i in items], [False] * len(items)), len(items)

    def collate(self, indices: list[int], epoch: int) -> ImageBatch:
        cfg = self.cfg
        randomised = cfg.shuffle_tags or cfg.caption_dropout or cfg.random_flip
        items, captions, flips = [], [], []
        for index in indices:
            items.append(index % self.train_count)
            if not randomised:
                captions.append(self._plain_captions[items[-1]])
                flips.append(False)
                continue
            rng = random.Random(f"{cfg.seed}/{epoch}/{index}")  # same draws for a sample whenever it is replayed
            captions.append(augment_caption(self.items[items[-1]].caption, rng, trigger_word=cfg.trigger_word,
                                            shuffle_tags=cfg.shuffle_tags, keep_tokens=cfg.keep_tokens,
                                            caption_dropout=cfg.caption_dropout))
            flips.append(cfg.random_flip and rng.random() < 0.5)
        return self._image_batch(items, captions, flips)

    def _image_batch(self, items: list[int], captions: list[str], flips: list[bool]) -> ImageBatch:
        """The batch of images `items` (indices into self.items, one bucket) with these captions and flips."""
        if self.latent_cache is not None:
            latents = torch.stack([self.latent_cache[i] for i in items])
        else:
            latents = self._encode_latents(items, flips)
        embeds = pooled = None
        if self.text_cache is not None:
            embeds, pooled = self._cached_text(captions)
        conditioning = self.recipe.size_conditioning([self.items[i].size for i in items],
                                                     [self.item_buckets[i] for i in items])
        return ImageBatch(latents, captions, embeds, pooled, conditioning)

    def _encode_latents(self, items: list[int], flips: list[bool]) -> torch.Tensor:
        if self.disk_cache is None:
            return self._vae_encode(items, flips)
        def encode(positions: list[int]) -> list[Features]:
            latents = self._vae_encode([items[p] for p in positions], [flips[p] for p in positions])
            return [{"latents": latent.cpu()} for latent in latents]

        keys = [f"latents|{self._cache_id}|{self._digests[i]}|{self.item_buckets[i]}|flip={flip}"
                f"|background={self.cfg.image_background}"  # transparent pixels are composited on it
                for i, flip in zip(items, flips)]
        return torch.stack([features["latents"] for features in self.disk_cache.fetch(keys, encode)])

    @torch.no_grad()
    def _vae_encode(self, items: list[int], flips: list[bool]) -> torch.Tensor:
        bucket = self.item_buckets[items[0]]
        pixels = torch.stack([load_pixels(self.items[i].path, bucket, flip, background=self.cfg.image_background,
                                          max_pixels=self.cfg.max_image_pixels)[0]
                              for i, flip in zip(items, flips)])
        vae, pixels = self.pipe.vae, pixels.to(self.device, torch.float32)
        own = getattr(self.recipe, "encode_latents", None)  # a family whose VAE is not an SD-style AutoencoderKL
        if own is not None:
            return own(vae, pixels)
        # The distribution's mean, not a sample: deterministic, and identical with or without the cache.
        latents = vae.encode(pixels).latent_dist.mean
        return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def _encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.device if self.text_cache is None else self.residency.encode_device
        return self.recipe.encode_text(self.pipe, captions, device)

    @torch.no_grad()
    def _cached_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        new = sorted({c for c in captions if c not in self.text_cache})
        if new:
            with self._in_phase("encode"):
                for caption, features in zip(new, self._text_features(new)):
                    self.text_cache[caption] = (features["embeds"].to(self.device),
                                                features["pooled"].to(self.device) if "pooled" in features else None)
        embeds = torch.stack([self.text_cache[c][0] for c in captions])
        pooled = self.text_cache[captions[0]][1]
        return embeds, (torch.stack([self.text_cache[c][1] for c in captions]) if pooled is not None else None)

    def _text_features(self, captions: list[str]) -> list[Features]:
        def encode(positions: list[int]) -> list[Features]:
            features = []
            for start in range(0, len(positions), ENCODE_CHUNK):  # a chunk's activations at a time
                chunk = positions[start:start + ENCODE_CHUNK]
                embeds, pooled = self._encode_text([captions[p] for p in chunk])
                features += [{"embeds": embeds[i], **({"pooled": pooled[i]} if pooled is not None else {})}
                             for i in range(len(chunk))]
            return features

        if self.disk_cache is None:
            return encode(list(range(len(captions))))
        keys = [f"text|{self._cache_id}|{self.family.name}|{self.weight_dtype}|{caption}" for caption in captions]
        return self.disk_cache.fetch(keys, encode)
