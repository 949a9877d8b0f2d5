"""Flux.1 LoRA on the tiny Flux pipeline: learning, the export diffusers / ComfyUI read, resume, preview, bad input."""

import threading

import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from studio.config import config_from_dict
from studio.errors import StudioError
from studio.events import EventSink
from studio.families import detect_family, get_family
from studio.loop import train
from studio.preview.images import ImagePreviewer
from tests.test_image_training import solid_colours

PROMPTS = ["a red picture, flat colour", "a blue picture, flat colour"]


def flux_config(model, data, out, **extra):
    values = {"preset": "demo-flux", "base_model": str(model), "train_data_dir": str(data), "output_dir": str(out),
              "sample_every_steps": 0, "sample_prompts": [], **extra}
    return config_from_dict(values)


def render_np(pipe, steps=2):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red picture", num_inference_steps=steps, height=64, width=64, max_sequence_length=16,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


@torch.no_grad()
def flow_loss(pipe, data, seeds=4):
    """Flow-matching loss on the dataset at fixed noise and sigmas: what the LoRA should have lowered."""
    from studio.data.images import load_pixels

    names = ["red", "blue", "green", "white"]
    pixels = torch.stack([load_pixels(data / f"{n}.png", (64, 64), False)[0] for n in names])
    vae = pipe.vae
    latents = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    embeds, pooled, text_ids = pipe.encode_prompt([f"a {n} picture, flat colour" for n in names], None,
                                                  max_sequence_length=16)
    b, c, h, w = latents.shape
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", latents.dtype)
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for _ in range(seeds):
        noise = torch.randn(latents.shape, generator=gen)
        sigma = torch.rand(b, generator=gen)
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise
        pred = pipe.transformer(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=sigma,
                                guidance=torch.ones(b), pooled_projections=pooled, encoder_hidden_states=embeds,
                                txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, 64, 64, pipe.vae_scale_factor)
        total += torch.nn.functional.mse_loss(pred, noise - latents).item()
    return total / seeds


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux")
    data = solid_colours(tmp / "colours")
    cfg = flux_config(demo.flux, data, tmp / "run", max_train_steps=60, batch_size=4, save_steps=30,
                      sample_every_steps=30, sample_prompts=["a red picture"])
    events = []
    return cfg, train(cfg, EventSink([events.append])), events, data


def test_family_is_detected_and_planned(demo, trained):
    assert detect_family("image-generation", str(demo.flux)).name == "flux1"
    _, _, events, _ = trained
    plan = events[0].data
    assert events[0].kind == "plan" and plan["family"] == "flux1" and plan["planned_peak_gb"] > 0


def test_loss_falls_and_export_loads_in_diffusers(demo, trained):
    _, result, events, data = trained
    pipe = FluxPipeline.from_pretrained(demo.flux)
    before = flow_loss(pipe, data)
    pipe.load_lora_weights(str(result.files[0]))
    after = flow_loss(pipe, data)
    assert after < 0.8 * before, (before, after)  # measured: 1.38 -> 1.0 (part of it is irreducible noise)
    samples = [e for e in events if e.kind == "sample"]
    assert [e.step for e in samples] == [30, 60]


def test_export_layout_and_strength(demo, trained):
    _, result, _, _ = trained
    path = result.files[0]
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    # diffusers' transformer.* keys (what ComfyUI's and Forge's Flux key maps read); alpha folded into lora_B.
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert any("single_transformer_blocks.0.attn.to_q" in k for k in keys)
    assert any("transformer_blocks.0.attn.add_q_proj" in k for k in keys)
    assert meta["ss_base_model_version"] == "flux1" and meta["studio_model_family"] == "flux1"
    pipe = FluxPipeline.from_pretrained(demo.flux)
    base = render_np(pipe)
    pipe.load_lora_weights(str(path), adapter_name="run")
    pipe.set_adapters(["run"], [0.0])
    assert (render_np(pipe) == base).all()  # strength 0 = the base model exactly
    pipe.set_adapters(["run"], [1.0])
    assert abs(render_np(pipe) - base).max() > 1e-4


def test_alpha_is_folded_into_the_export(demo, tmp_path):
    """alpha ≠ rank: the file alone (no alpha keys) must give the strength the run trained with."""
    data = solid_colours(tmp_path / "colours")
    result = train(flux_config(demo.flux, data, tmp_path / "a", max_train_steps=2, lora_rank=4, lora_alpha=2))
    exported = load_file(str(result.files[0]))
    state = load_file(str(result.output_dir / "checkpoints" / "step-000002" / "adapter.safetensors"))
    key = next(k for k in exported if ".lora_B." in k)
    torch.testing.assert_close(exported[key], state[key] * 0.5)


def test_resume_matches_uninterrupted_run(demo, tmp_path):
    data = solid_colours(tmp_path / "colours")
    common = dict(max_train_steps=8, batch_size=2, save_steps=4, gradient_accumulation_steps=2,
                  caption_dropout=0.25, lora_dropout=0.1)
    full = train(flux_config(demo.flux, data, tmp_path / "full", **common))
    stop = threading.Event()
    first = train(flux_config(demo.flux, data, tmp_path / "part", **common),
                  EventSink([lambda e: e.kind == "progress" and e.step == 4 and stop.set()]), stop)
    assert first.stopped and first.step == 4
    resumed = train(flux_config(demo.flux, data, tmp_path / "part", **common, resume_from="latest"))
    a, b = load_file(str(full.files[0])), load_file(str(resumed.files[0]))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_preview_mixes_flux_adapters_and_refuses_sd_ones(demo, trained, tmp_path):
    _, result, _, _ = trained
    previewer = ImagePreviewer(torch.device("cpu"))
    base = previewer.generate(str(demo.flux), [], "a red picture", seed=1, width=64, height=64)
    full = previewer.generate(str(demo.flux), [(str(result.files[0]), 1.0)], "a red picture", seed=1, width=64,
                              height=64)
    off = previewer.generate(str(demo.flux), [(str(result.files[0]), 0.0)], "a red picture", seed=1, width=64,
                             height=64)
    assert list(off.getdata()) == list(base.getdata()) and list(full.getdata()) != list(base.getdata())
    sd_lora = tmp_path / "sd.safetensors"
    from safetensors.torch import save_file
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(sd_lora))
    with pytest.raises(StudioError, match="is a LoRA for SD1.5, but the base model is Flux.1"):
        previewer.generate(str(demo.flux), [(str(sd_lora), 1.0)], "a red picture", width=64, height=64)


def test_bad_input_gets_one_clear_message(demo, tmp_path):
    data = solid_colours(tmp_path / "colours")
    with pytest.raises(StudioError, match="is a Flux.1 image model, but task_type is text-generation"):
        detect_family("text-generation", str(demo.flux))
    with pytest.raises(StudioError, match="min_snr_gamma .* Flux.1 trains with flow matching"):
        train(flux_config(demo.flux, data, tmp_path / "snr", min_snr_gamma=5.0, max_train_steps=1))


def test_family_values_fill_the_presets(demo):
    """The style preset on Flux takes the family's learning rate and rank; the user's keys still win."""
    from studio.hardware import detect
    from studio.plan.fit import fit_config

    base = {"preset": "style", "base_model": str(demo.flux), "train_data_dir": str(demo.images), "output_dir": "x"}
    fitted = fit_config(base, detect(), check_paths=False)
    assert (fitted.cfg.learning_rate, fitted.cfg.lora_rank) == (1e-4, 16) and "learning_rate" in fitted.reasons
    assert fitted.cfg.resolution == get_family("flux1").native_resolution
    mine = fit_config({**base, "learning_rate": 3e-4}, detect(), check_paths=False)
    assert mine.cfg.learning_rate == 3e-4


def test_fp8_base_trains_with_the_transformer_stored_in_fp8(demo, tmp_path):
    data = solid_colours(tmp_path / "colours")
    events = []
    result = train(flux_config(demo.flux, data, tmp_path / "fp8", max_train_steps=3, fp8_base=True),
                   EventSink([events.append]))
    losses = [e.data["loss"] for e in events if e.kind == "progress"]
    assert len(losses) == 3 and all(loss == loss for loss in losses)  # finite, no NaN
    exported = load_file(str(result.files[0]))
    assert exported and all(t.dtype == torch.float32 for t in exported.values())  # LoRA weights stay fp32


def test_nf4_base_trains_a_lora_that_works_on_the_full_precision_base(demo, tmp_path, monkeypatch):
    """load_in_4bit (the 12-16 GB tier): the transformer's linear layers are stored in NF4 on bitsandbytes' CPU
    backend here (the product asks for CUDA), LoRA trains on top, and the export improves the unquantized base."""
    import bitsandbytes as bnb

    from studio.engines import make_engine
    from studio.engines.diffusion import DiffusionEngine

    monkeypatch.setattr(DiffusionEngine, "four_bit_needs_cuda", False)
    data = solid_colours(tmp_path / "colours")
    cfg = flux_config(demo.flux, data, tmp_path / "nf4", max_train_steps=60, batch_size=4, load_in_4bit=True)
    engine = make_engine(cfg, torch.device("cpu"), None, EventSink())
    engine.load()
    plain = [name for name, m in engine.denoiser.named_modules() if type(m) is torch.nn.Linear]
    assert plain and all(".lora_A." in name or ".lora_B." in name for name in plain)  # only LoRA's own A/B (fp32)
    wrapped = [m.base_layer for m in engine.denoiser.modules() if hasattr(m, "base_layer")]
    assert wrapped and all(isinstance(layer, bnb.nn.Linear4bit) for layer in wrapped)
    result = train(cfg)
    pipe = FluxPipeline.from_pretrained(demo.flux)
    before = flow_loss(pipe, data)
    pipe.load_lora_weights(str(result.files[0]))
    after = flow_loss(pipe, data)
    assert after < 0.8 * before, (before, after)  # measured: 1.38 -> 1.01, as with the fp32 base


def test_base_formats_are_checked(demo, tmp_path):
    data = solid_colours(tmp_path / "colours")
    with pytest.raises(StudioError, match="load_in_4bit needs a CUDA GPU"):
        train(flux_config(demo.flux, data, tmp_path / "a", max_train_steps=1, load_in_4bit=True))
    with pytest.raises(StudioError, match="set one of them to false"):
        train(flux_config(demo.flux, data, tmp_path / "b", max_train_steps=1, load_in_4bit=True, fp8_base=True))
    sd = config_from_dict({"preset": "demo-image", "base_model": str(demo.sd15), "train_data_dir": str(data),
                           "output_dir": str(tmp_path / "c"), "max_train_steps": 1, "fp8_base": True})
    with pytest.raises(StudioError, match="fp8_base is not available for SD1.5 models; set fp8_base: false"):
        train(sd)
