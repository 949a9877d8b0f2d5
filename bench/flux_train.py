"""Flux.1 training benchmark on the tiny Flux pipeline (CPU or GPU), measured in one run.

Seconds per step of the studio trainer vs a minimal hand-written diffusers+peft Flux loop doing the same work (same
model, data, batch, LoRA targets, cached latents and T5/CLIP embeddings, flow-matching loss with logit-normal
sigmas, packed latents, guidance input). Target ratio <= 1.05.

Run: `.venv/bin/python bench/flux_train.py` (add --write to update bench/RESULTS.md).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import FluxPipeline  # noqa: E402
from peft import LoraConfig  # noqa: E402

# The same trainer measurement, sizes and comparison as the SD1.5 bench: only the model differs.
from bench.image_train import BATCH, RANK, STEPS, WARMUP, trainer_vs_reference  # noqa: E402
from bench.results import update_results  # noqa: E402
from studio.data.images import load_pixels  # noqa: E402
from studio.demo import ensure_demo  # noqa: E402
from studio.demo.datasets import build_demo_images  # noqa: E402
from studio.families.flux1 import FluxRecipe  # noqa: E402

def reference_seconds_per_step(model: Path, data: Path) -> float:
    """The loop a diffusers user would write from the Flux LoRA example, with the same caching the trainer does."""
    torch.manual_seed(0)
    pipe = FluxPipeline.from_pretrained(model)
    transformer, vae = pipe.transformer, pipe.vae
    for m in (transformer, vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                       target_modules=list(FluxRecipe.targets)))
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    images = sorted(data.glob("*.png"))
    with torch.no_grad():
        pixels = torch.stack([load_pixels(p, (64, 64))[0] for p in images])
        latents = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        embeds, pooled, text_ids = pipe.encode_prompt([p.stem for p in images], None,
                                                      max_sequence_length=pipe.tokenizer_2.model_max_length)
    b, c, h, w = BATCH, *latents.shape[1:]
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", latents.dtype)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(STEPS):
        idx = torch.randperm(len(images), generator=gen)[:BATCH]
        x = latents[idx]
        noise = torch.randn(x.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(b, generator=gen))
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * x + sigma.view(-1, 1, 1, 1) * noise
        pred = transformer(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=sigma,
                           guidance=torch.ones(b), pooled_projections=pooled[idx], encoder_hidden_states=embeds[idx],
                           txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                            pipe.vae_scale_factor)
        loss = F.mse_loss(pred, noise - x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return (times[-1] - times[WARMUP - 1]) / (STEPS - WARMUP)


def main() -> str:
    tmp = Path(tempfile.mkdtemp())
    demo = ensure_demo(tmp / "ws")
    data = tmp / "data"
    build_demo_images(data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = [f"Tiny Flux.1 (64 px, batch {BATCH}, rank {RANK}, attention targets) on {device}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads.", ""]
    lines += trainer_vs_reference(reference_seconds_per_step, demo.flux, data, tmp,
                                  "hand-written diffusers+peft Flux loop")
    return "\n".join(lines)


if __name__ == "__main__":
    report = main()
    print(report)
    if "--write" in sys.argv:
        update_results("flux_train", report)
