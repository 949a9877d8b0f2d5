"""Loading base models (diffusers pipelines, single-file checkpoints with the configs shipped in configs/, causal
LMs): below engines/, export/ and preview/, which all read models the same way through here."""

from pathlib import Path

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent, as diffusers' pipelines compute it from a VAE config (a dict or a FrozenDict):
    AutoencoderKL's levels less one; Qwen-Image's video VAE, its downsamplings."""
    if "block_out_channels" in vae_config:
        return 2 ** (len(vae_config["block_out_channels"]) - 1)
    return 2 ** len(vae_config["temperal_downsample"])
