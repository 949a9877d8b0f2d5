"""Image LoRA training on the tiny SD models: learning, WebUI-format export, resume, init_lora, SDXL."""

import csv
import threading

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from studio.config import config_from_dict
from studio.data.images import DatasetError
from studio.errors import StudioError
from studio.events import EventSink
from studio.loop import train


def solid_colours(folder, size=(64, 64)):
    """A learnable toy task: each caption names the flat colour of its image."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 230), "white": (250, 250, 250)}
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "prompt"])
        for name, rgb in colours.items():
            Image.new("RGB", size, rgb).save(folder / f"{name}.png")
            writer.writerow([f"{name}.png", f"a {name} picture, flat colour"])
    return folder


def render_np(pipe, steps=4):
    """A 64 px image for a fixed prompt and seed, as an array."""
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red picture", num_inference_steps=steps, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def image_config(model, data, out, **extra):
    values = {"preset": "demo-image", "base_model": str(model), "train_data_dir": str(data),
              "output_dir": str(out), "sample_every_steps": 0, "sample_prompts": [], **extra}
    return config_from_dict(values)


@torch.no_grad()
def eval_loss(pipe, folder, seeds=4):
    """Denoising loss on the dataset at fixed noise and timesteps: a low-variance measure of what was learned."""
    rows = list(csv.DictReader(open(folder / "metadata.csv", encoding="utf-8")))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = torch.stack([torch.from_numpy(__import__("numpy").asarray(Image.open(folder / r["filename"]).convert(
        "RGB"), dtype="float32") / 127.5 - 1).permute(2, 0, 1) for r in rows])
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    embeds = pipe.encode_prompt([r["prompt"] for r in rows], "cpu", 1, False)[0]
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for _ in range(seeds):
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (len(rows),), generator=gen)
        pred = pipe.unet(scheduler.add_noise(latents, noise, t), t, embeds).sample
        total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / seeds


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("img")
    data = solid_colours(tmp / "colours")
    # LoRA on the ResNet convs too: the tiny random UNet's few attention layers alone can only learn the mean.
    cfg = image_config(demo.sd15, data, tmp / "run", max_train_steps=60, learning_rate=1e-2, lora_rank=8,
                       lora_alpha=16, save_steps=30, batch_size=4, sample_every_steps=30,
                       target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
                       sample_prompts=["a red picture, flat colour"])
    events = []
    result = train(cfg, EventSink([events.append]))
    return cfg, result, events, data


def test_loss_falls_on_learnable_task(demo, trained):
    cfg, result, _, data = trained
    pipe = StableDiffusionPipeline.from_pretrained(demo.sd15)
    before = eval_loss(pipe, data)
    pipe.load_lora_weights(str(result.files[0]))
    after = eval_loss(pipe, data)
    assert after < 0.6 * before, (before, after)  # measured: 1.09 -> ~0.3


def test_events_and_outputs(trained):
    cfg, result, events, _ = trained
    kinds = [e.kind for e in events]
    assert kinds[0] == "plan" and "start" in kinds and kinds[-1] == "done"
    plan = events[0].data  # the memory plan, made before any weight loaded
    assert plan["family"] == "sd15" and plan["planned_peak_gb"] > 0 and "activations" in {r[0] for r in plan["rows"]}
    progress = [e for e in events if e.kind == "progress"]
    assert [e.step for e in progress] == list(range(1, 61)) and all(e.total == 60 for e in progress)
    assert {"loss", "lr", "it_per_s", "eta_s"} <= set(progress[-1].data)
    samples = [e for e in events if e.kind == "sample"]
    assert [e.step for e in samples] == [30, 60] and all(
        __import__("os").path.isfile(s["image"]) for e in samples for s in e.data["samples"])
    out = result.output_dir
    assert (out / "config.yaml").is_file() and (out / "events.jsonl").is_file()
    assert list((out / "logs").glob("events.out.tfevents.*")), "TensorBoard event file"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000030", "step-000060"]


def test_export_is_kohya_format_with_true_alpha_and_metadata(trained):
    cfg, result, _, _ = trained
    path = result.files[0]
    assert path.name == "run.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alphas = {k: f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert all(k.startswith("lora_unet_") for k in keys)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    for module in modules:
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= set(keys)
    assert set(alphas.values()) == {16.0}  # lora_alpha, not the rank diffusers writes
    assert any("attn1_to_q" in k for k in keys) and any("to_out_0" in k for k in keys)
    assert any(k.endswith("resnets_0_conv1.lora_down.weight") for k in keys)
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "16.0"
    assert meta["ss_steps"] == "60" and meta["ss_num_train_images"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert float(meta["ss_training_time_s"]) > 0 and meta["ss_resolution"] == "(64, 64)"


def test_export_loads_in_diffusers_and_strength_matters(demo, trained):
    _, result, _, _ = trained
    pipe = StableDiffusionPipeline.from_pretrained(demo.sd15)
    image = lambda: render_np(pipe)  # noqa: E731
    base = image()
    pipe.load_lora_weights(str(result.files[0]), adapter_name="mine")
    pipe.set_adapters(["mine"], [0.0])
    assert (image() == base).all()  # strength 0 is exactly the base model
    pipe.set_adapters(["mine"], [1.0])
    full = image()
    pipe.set_adapters(["mine"], [0.5])
    half = image()
    assert abs(full - base).max() > 1e-3 and abs(half - base).max() > 1e-4 and abs(full - half).max() > 1e-4


def test_resume_matches_uninterrupted_run(demo, tmp_path):
    data = solid_colours(tmp_path / "colours")
    common = dict(max_train_steps=12, batch_size=2, save_steps=5, gradient_accumulation_steps=2,
                  lr_scheduler="cosine", lr_warmup_steps=2, lora_dropout=0.1, caption_dropout=0.2,
                  noise_offset=0.05)
    full = train(image_config(demo.sd15, data, tmp_path / "full", **common))
    partial = image_config(demo.sd15, data, tmp_path / "part", **{**common, "max_train_steps": 12})
    stop = threading.Event()
    # Stop at step 5 (right after its checkpoint), then resume from the latest checkpoint.
    first = train(partial, EventSink([lambda e: e.kind == "progress" and e.step == 5 and stop.set()]), stop)
    assert first.stopped and first.step == 5
    resumed = train(image_config(demo.sd15, data, tmp_path / "part", **common, resume_from="latest"))
    assert resumed.step == full.step == 12
    a, b = load_file(str(full.files[0])), load_file(str(resumed.files[0]))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_stop_saves_checkpoint_and_adapter(demo, tmp_path):
    data = solid_colours(tmp_path / "colours")
    stop = threading.Event()
    stop.set()  # requested before the first step ends: the run stops after exactly one step
    result = train(image_config(demo.sd15, data, tmp_path / "run", max_train_steps=50), stop=stop)
    assert result.stopped and result.step == 1
    assert (tmp_path / "run" / "checkpoints" / "step-000001" / "state.pt").is_file()
    assert result.files[0].is_file()


def test_init_lora_starts_from_given_weights(demo, trained, tmp_path):
    _, result, _, data = trained
    given = load_file(str(result.files[0]))
    # lr 0: the run cannot move the weights, so its export must equal what it started from.
    cfg = image_config(demo.sd15, data, tmp_path / "inc", init_lora=str(result.files[0]), learning_rate=0.0,
                       lora_rank=8, lora_alpha=16, max_train_steps=1, target_modules=trained[0].target_modules)
    exported = load_file(str(train(cfg).files[0]))
    for key in given:
        torch.testing.assert_close(exported[key], given[key])


def test_init_lora_with_other_rank_is_a_clear_error(demo, trained, tmp_path):
    _, result, _, data = trained
    cfg = image_config(demo.sd15, data, tmp_path / "inc", init_lora=str(result.files[0]), lora_rank=4,
                       max_train_steps=1, target_modules=trained[0].target_modules)
    with pytest.raises(StudioError, match="Set lora_rank to the file's rank \\(8\\)"):
        train(cfg)
    fewer = image_config(demo.sd15, data, tmp_path / "inc2", init_lora=str(result.files[0]), lora_rank=8,
                         max_train_steps=1, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with pytest.raises(StudioError, match="module\\(s\\) this run does not train"):
        train(fewer)


def test_sdxl_trains_and_exports(demo, tmp_path):
    data = solid_colours(tmp_path / "colours", size=(96, 64))
    cfg = image_config(demo.sdxl, data, tmp_path / "xl", max_train_steps=4, lora_rank=4)
    result = train(cfg)
    with safe_open(str(result.files[0]), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert all(k.startswith("lora_unet_") for k in f.keys())
    pipe = StableDiffusionXLPipeline.from_pretrained(demo.sdxl)
    base = render_np(pipe, steps=2)
    pipe.load_lora_weights(str(result.files[0]))
    assert abs(render_np(pipe, steps=2) - base).max() > 1e-5


def test_diffusers_format_export_is_the_same_model_as_the_kohya_file(demo, tmp_path):
    """export_peft_format: every layer (UNet and both SDXL text encoders) with its alpha, alpha ≠ rank."""
    data = solid_colours(tmp_path / "colours")
    result = train(image_config(demo.sdxl, data, tmp_path / "xl", max_train_steps=2, lora_rank=4, lora_alpha=2,
                                train_text_encoder=True, export_peft_format=True))
    renders = []
    for file in result.files:
        pipe = StableDiffusionXLPipeline.from_pretrained(demo.sdxl)
        pipe.load_lora_weights(str(file))
        layers = sum(1 for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for m in part.modules()
                     if getattr(m, "lora_A", None))
        renders.append((layers, render_np(pipe, steps=2)))
    (kohya_layers, kohya), (peft_layers, peft) = renders
    assert kohya_layers == peft_layers > 0
    assert abs(kohya - peft).max() < 1e-5


def test_text_encoder_lora_exports_lora_te(demo, tmp_path):
    data = solid_colours(tmp_path / "colours")
    result = train(image_config(demo.sd15, data, tmp_path / "te", max_train_steps=2, train_text_encoder=True,
                                export_peft_format=True))
    keys = load_file(str(result.files[0])).keys()
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert result.files[1].name == "pytorch_lora_weights.safetensors" and result.files[1].is_file()
    pipe = StableDiffusionPipeline.from_pretrained(demo.sd15)
    ids = pipe.tokenizer(["a red picture"], return_tensors="pt").input_ids
    before = pipe.text_encoder(ids)[0]
    pipe.load_lora_weights(str(result.files[0]))  # diffusers reads the lora_te_ keys too
    assert (pipe.text_encoder(ids)[0] - before).abs().max() > 1e-6


def test_broken_dataset_never_starts_training(demo, tmp_path):
    data = solid_colours(tmp_path / "colours")
    (data / "white.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="white.png: cannot be read as an image"):
        train(image_config(demo.sd15, data, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_adapters_along_the_way_load_in_diffusers(demo, trained):
    """save_adapter_every (default: with every checkpoint) exports <name>-stepNNNNNN.safetensors with the same header,
    so a user can pick the step that looks best."""
    cfg, result, events, _ = trained
    step = result.output_dir / f"{cfg.name}-step000030.safetensors"
    with safe_open(str(step), "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "30" and meta["ss_output_name"] == cfg.name and meta["studio_selftest"].startswith("all")
    pipe = StableDiffusionPipeline.from_pretrained(demo.sd15)
    base = render_np(pipe, steps=2)
    pipe.load_lora_weights(str(step), adapter_name="step30")
    pipe.load_lora_weights(str(result.files[0]), adapter_name="final")
    pipe.set_adapters(["step30"], [1.0])
    halfway = render_np(pipe, steps=2)
    pipe.set_adapters(["final"], [1.0])
    assert abs(halfway - base).max() > 1e-4 and abs(render_np(pipe, steps=2) - halfway).max() > 1e-4
    assert not (result.output_dir / f"{cfg.name}-step000060.safetensors").exists()  # the last step is the final one
