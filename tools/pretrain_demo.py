"""Pretrain the demo's tiny SD1.5 on generated coloured shapes, so its base model draws them (maintainer tool).

The weights it writes are committed under studio/demo/weights/tiny-sd15/ and copied into every demo workspace by
`studio.demo.ensure_demo`; run it again only when the demo model's architecture or the shapes change:

    python tools/pretrain_demo.py [--out studio/demo/weights/tiny-sd15] [--threads 1]

It starts from `studio.demo.diffusion.build_tiny_sd15` (random weights: the exact demo architecture) and trains in two
phases on shapes drawn by `studio.demo.datasets.draw_shape` at random sizes and places:
1. the VAE alone, on shapes in all PALETTE colours: reconstruction plus a small KL term; then its latents are normalised in
   place (the quant convs absorb each channel's mean and spread), so the config's scaling_factor gives unit-variance
   latents;
2. the UNet and the text encoder together on the frozen VAE's latents of shapes in the base colours, with captions
   like "a red circle" (epsilon prediction, as studio's trainer; 10% empty captions so classifier-free guidance has
   an unconditional model).
The denoiser and the text encoder never see the colour the demo LoRA teaches (datasets.TAUGHT_COLOUR) nor its name.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root holds the studio package

from diffusers import StableDiffusionPipeline  # noqa: E402
from diffusers.optimization import get_cosine_schedule_with_warmup  # noqa: E402
from diffusers.training_utils import compute_snr  # noqa: E402

from studio.demo.datasets import COLOURS, PALETTE, SHAPES, caption, draw_shape  # noqa: E402
from studio.demo.diffusion import PRETRAINED_SD15, build_tiny_sd15  # noqa: E402

SIDE = 64
UNCONDITIONAL = 0.1  # share of empty captions


def drawing(rng: random.Random, colour: str, shape: str) -> torch.Tensor:
    """One 64 px `shape` of random size and place, as a (3, 64, 64) tensor in [-1, 1]."""
    centre = (rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6))
    image = draw_shape(shape, colour, (SIDE, SIDE), scale=rng.uniform(0.45, 0.7), centre=centre)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def palette_shapes(rng: random.Random, n: int) -> torch.Tensor:
    """The VAE's images: shapes in every PALETTE colour, the demo LoRA's included. A VAE must encode every colour the
    model may draw; this tiny one learns a handful of colours well, but not arbitrary ones (its colours end up on
    one latent axis), so the palette is all it sees."""
    return torch.stack([drawing(rng, rng.choice(list(PALETTE)), rng.choice(SHAPES)) for _ in range(n)])


def named_shapes(rng: random.Random, n: int) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """The denoiser's images, in the base colours only, with their (colour, shape)."""
    labels = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(n)]
    return torch.stack([drawing(rng, colour, shape) for colour, shape in labels]), labels


def random_caption(rng: random.Random, colour: str, shape: str) -> str:
    roll = rng.random()
    if roll < UNCONDITIONAL:
        return ""
    return caption(colour, shape) if roll < 0.55 else f"a {colour} {shape}"


def train_vae(vae, steps: int, batch: int, rng: random.Random) -> float:
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, 50, steps)
    for step in range(1, steps + 1):
        pixels = palette_shapes(rng, batch)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # A small KL term keeps the latent space smooth enough for the UNet's imperfect latents to decode.
        loss = F.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps:
            print(f"vae step {step}/{steps}: loss {loss.item():.5f}", flush=True)
    vae.eval()
    return loss.item()


@torch.no_grad()
def normalise_latents(vae, pixels: torch.Tensor) -> None:
    """Reparametrise the VAE so `latent_dist.mean * scaling_factor` has zero mean and unit spread per channel:
    quant_conv's mean rows map z to k·(z − m), post_quant_conv takes z'/k + m back. Decoding is unchanged."""
    mean = vae.encode(pixels).latent_dist.mean
    m = mean.mean(dim=(0, 2, 3))
    k = 1.0 / (mean.std(dim=(0, 2, 3)) * vae.config.scaling_factor)
    c = len(m)
    quant, post = vae.quant_conv, vae.post_quant_conv
    quant.weight[:c] *= k[:, None, None, None]
    quant.bias[:c] = k * (quant.bias[:c] - m)
    quant.bias[c:] += 2 * torch.log(k)  # the log-variance follows the scale
    post.bias += post.weight[:, :, 0, 0] @ m
    post.weight /= k[None, :, None, None]


def encode_captions(pipe, captions: list[str]) -> torch.Tensor:
    """The embeddings StableDiffusionPipeline.encode_prompt makes, with gradients for the text encoder."""
    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def loss_weight(snr: torch.Tensor) -> torch.Tensor:
    """Epsilon-loss weights: min-SNR-5 (Hang et al. 2023) where the noise is low; where it is high, where the colour of
    the shape is decided, the error in the implied image (1/SNR, capped at 20): with min-SNR weighting alone the tiny
    model learnt the shapes but drew the wrong base colour for some seeds."""
    return torch.maximum(snr.clamp(max=5.0) / snr, (1 / snr).clamp(max=20.0))


def train_denoiser(pipe, steps: int, batch: int, images: int, rng: random.Random) -> float:
    """UNet + text encoder on latents of `images` fixed drawings (epsilon prediction, as the scheduler says)."""
    pixels, labels = named_shapes(rng, images)
    with torch.no_grad():
        latents = torch.cat([pipe.vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
    latents = latents * pipe.vae.config.scaling_factor
    scheduler, unet, text_encoder = pipe.scheduler, pipe.unet, pipe.text_encoder
    unet.train()
    text_encoder.train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, 100, steps)
    average = None
    for step in range(1, steps + 1):
        picked = [rng.randrange(images) for _ in range(batch)]
        x0 = latents[picked]
        embeds = encode_captions(pipe, [random_caption(rng, *labels[i]) for i in picked])
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        pred = unet(scheduler.add_noise(x0, noise, timesteps), timesteps, embeds).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight(compute_snr(scheduler, timesteps))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        average = loss.item() if average is None else 0.98 * average + 0.02 * loss.item()
        if step % 100 == 0 or step == steps:
            print(f"denoiser step {step}/{steps}: loss {loss.item():.4f} (running mean {average:.4f})", flush=True)
    unet.eval()
    text_encoder.eval()
    return average


@torch.no_grad()
def centre_colours(pipe, seeds: int = 4) -> dict[str, float]:
    """For each base colour: how often the centre of 'a <colour> circle' is nearest that colour (of COLOURS)."""
    hits = {}
    for colour in COLOURS:
        right = 0
        for seed in range(seeds):
            image = pipe(caption(colour, "circle"), num_inference_steps=20, height=SIDE, width=SIDE,
                         output_type="np", generator=torch.Generator().manual_seed(seed)).images[0] * 255
            centre = image[24:40, 24:40].reshape(-1, 3).mean(axis=0)
            nearest = min(COLOURS, key=lambda c: np.linalg.norm(centre - np.array(COLOURS[c])))
            right += nearest == colour
        hits[colour] = right / seeds
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PRETRAINED_SD15)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (other work may share the machine)")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--denoiser-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusionPipeline.from_pretrained(build_tiny_sd15(tmp, seed=args.seed))
    for part in (pipe, pipe.unet, pipe.vae):
        part.register_to_config(_name_or_path="tiny-sd15")  # not the temporary folder it was built in
    pipe.set_progress_bar_config(disable=True)
    vae_loss = train_vae(pipe.vae, args.vae_steps, batch=16, rng=rng)
    pipe.vae.requires_grad_(False)
    normalise_latents(pipe.vae, named_shapes(rng, 512)[0])
    denoiser_loss = train_denoiser(pipe, args.denoiser_steps, batch=64, images=4096, rng=rng)
    pipe.save_pretrained(args.out)
    print(f"Saved {args.out} after {(time.time() - started) / 60:.1f} min: final VAE loss {vae_loss:.5f}, "
          f"denoiser loss {denoiser_loss:.4f} (running mean); centre colour right: {centre_colours(pipe)}")


if __name__ == "__main__":
    main()
