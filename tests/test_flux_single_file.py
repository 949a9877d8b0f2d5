"""Single-file Flux.1 checkpoints (BFL layout, bare or as a ComfyUI full checkpoint): kind detection, the layouts that
are refused, loading through diffusers' converters with the shipped configs, the BFL writer against diffusers'
converter, and the shipped configs' published sizes."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio.demo.flux import build_tiny_flux, tiny_flux_transformer
from studio.demo.flux_single_file import transformer_to_bfl, write_flux_checkpoint
from studio.errors import StudioError
from studio.models import CONFIG_ROOT
from studio.models.flux_keys import bfl_to_diffusers
from studio.models.flux_single_file import flux_kind, load_flux_single_file

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny diffusers Flux folder, its transformer as a bare BFL file and as a ComfyUI full checkpoint."""
    root = tmp_path_factory.mktemp("flux_single_file")
    folder = build_tiny_flux(root / "tiny-flux")
    return {"folder": folder,
            "file": write_flux_checkpoint(folder, root / "unet" / "flux1-dev.safetensors"),
            "full": write_flux_checkpoint(folder, root / "checkpoints" / "flux1-dev-full.safetensors", full=True),
            "root": root}


@pytest.fixture(scope="module")
def ref(tiny):
    from diffusers import FluxPipeline
    return FluxPipeline.from_pretrained(tiny["folder"])


def _shapes(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _image(pipe):
    # Copy every weight into a fresh allocation first: the CPU matmul kernels pick their path by the address of the
    # weights (memory-mapped from a file vs allocated), which moves results in the last bits. With the same weights
    # at aligned addresses, the same computation gives the same bits.
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        for p in getattr(pipe, name).parameters():
            p.data = p.data.clone()
    return pipe(PROMPT, num_inference_steps=2, height=64, width=64, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def _check_pipeline(pipe, ref, path):
    assert type(pipe) is type(ref)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        _same_weights(getattr(pipe, name), getattr(ref, name))
    assert pipe.transformer.config.guidance_embeds
    scheduler = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    assert scheduler == {k: v for k, v in ref.scheduler.config.items() if not k.startswith("_")}
    assert pipe.config._name_or_path == str(path)
    a, b = _image(pipe), _image(ref)
    assert a.shape == (1, 3, 64, 64) and a.std() > 0.01
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------- loading

def test_transformer_file_loads_with_components_folder(tiny, ref):
    shapes = _shapes(tiny["file"])
    assert "double_blocks.0.img_attn.qkv.weight" in shapes and "single_blocks.0.linear1.weight" in shapes
    assert not any(k.startswith(("vae.", "text_encoders.", "model.")) for k in shapes)
    pipe = load_flux_single_file(tiny["file"], components=str(tiny["folder"]))
    _check_pipeline(pipe, ref, tiny["file"])


def test_full_checkpoint_loads_its_own_vae_and_text_encoders(tiny, ref):
    shapes = _shapes(tiny["full"])
    for prefix in ("model.diffusion_model.double_blocks.", "vae.encoder.down.0.block.0.",
                   "text_encoders.clip_l.transformer.text_model.", "text_encoders.t5xxl.transformer.encoder.block."):
        assert any(k.startswith(prefix) for k in shapes), prefix
    # The components folder gives tokenizers only: without its weights the encoders and VAE must come from the file.
    components = tiny["root"] / "tokenizers-only"
    shutil.copytree(tiny["folder"], components)
    for weights in components.glob("*/*.safetensors"):
        weights.unlink()
    pipe = load_flux_single_file(tiny["full"], components=str(components))
    _check_pipeline(pipe, ref, tiny["full"])
    t5 = pipe.text_encoder_2
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()


def test_schnell_file_loads_with_schnell_scheduler(tiny):
    torch.manual_seed(1)
    model = tiny_flux_transformer(guidance=False)
    path = tiny["root"] / "flux1-schnell.safetensors"
    save_file(transformer_to_bfl(model.state_dict()), str(path))
    shapes = _shapes(path)
    assert not any(k.startswith("guidance_in.") for k in shapes)
    assert flux_kind(shapes, path.name) == "schnell"
    pipe = load_flux_single_file(path, components=str(tiny["folder"]))
    assert not pipe.transformer.config.guidance_embeds
    _same_weights(pipe.transformer, model)
    assert not pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 1.0


def test_pickle_is_refused_unless_allowed(tiny, ref):
    path = tiny["root"] / "flux1-dev.ckpt"
    torch.save({"state_dict": load_file(tiny["file"])}, path)
    with pytest.raises(StudioError, match="pickle") as err:
        load_flux_single_file(path, components=str(tiny["folder"]))
    assert "allow_unsafe_pickle" in str(err.value)
    pipe = load_flux_single_file(path, components=str(tiny["folder"]), allow_unsafe_pickle=True)
    _same_weights(pipe.transformer, ref.transformer)


@pytest.mark.parametrize("components", ["missing-folder", "studio-tests/no-such-flux-model", "not-flux-folder"])
def test_unreadable_components_say_how_to_set_base_components(tiny, components):
    if components != "studio-tests/no-such-flux-model":
        folder = tiny["root"] / components
        if components == "not-flux-folder":
            folder.mkdir(exist_ok=True)
            (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        components = str(folder)
    with pytest.raises(StudioError) as err:
        load_flux_single_file(tiny["file"], components=components)
    message = str(err.value)
    assert "base_components" in message and components in message
    assert 'hf download black-forest-labs/FLUX.1-schnell --local-dir models/flux1-schnell --exclude "transformer/*"' \
        in message


# ----------------------------------------------------------------------------------------------- recognising

def test_flux_kind_reads_the_header(tiny):
    shapes = _shapes(tiny["file"])
    assert flux_kind(shapes, "flux1-dev.safetensors") == "dev"
    assert flux_kind(_shapes(tiny["full"]), "flux1-dev-full.safetensors") == "dev"
    schnell = {k: v for k, v in shapes.items() if not k.startswith("guidance_in.")}
    assert flux_kind(schnell, "x.safetensors") == "schnell"
    assert flux_kind({"model.diffusion_model." + k: v for k, v in schnell.items()}, "x.safetensors") == "schnell"
    sd15 = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
            "first_stage_model.decoder.conv_in.weight": (1,)}
    assert flux_kind(sd15, "v1-5.safetensors") is None
    assert flux_kind({}, "empty.safetensors") is None


def test_registry_recognises_the_file_as_flux(tiny):
    from studio.models.single_file import detect_family
    assert detect_family(tiny["file"]).name == "flux1"
    assert detect_family(tiny["full"]).name == "flux1"


def _write(path, shapes):
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


def _flux_header(in_features=64, prefix=""):
    return {prefix + k: s for k, s in {
        "img_in.weight": (8, in_features), "vector_in.in_layer.weight": (8, 4), "guidance_in.in_layer.weight": (8, 4),
        "double_blocks.0.img_mod.lin.weight": (48, 8), "double_blocks.0.img_attn.qkv.weight": (24, 8),
        "single_blocks.0.linear1.weight": (56, 8)}.items()}


@pytest.mark.parametrize("case, says", [
    ("fill", "Fill"), ("fill-comfy", "Fill"), ("depth", "Depth or Canny"), ("redux", "Redux"),
    ("kontext", "Kontext"), ("diffusers", "diffusers layout"), ("lora", "is a LoRA, not a base model"),
    ("kohya-lora", "is a LoRA, not a base model")])
def test_refused_layouts_name_what_the_file_is(tiny, case, says):
    root = tiny["root"]
    if case == "fill":
        path = _write(root / "flux1-fill-dev.safetensors", _flux_header(384))
    elif case == "fill-comfy":
        path = _write(root / "comfy-fill.safetensors", _flux_header(384, "model.diffusion_model."))
    elif case == "depth":
        path = _write(root / "flux1-depth-dev.safetensors", _flux_header(128))
    elif case == "redux":
        path = _write(root / "flux1-redux-dev.safetensors", {"redux_up.weight": (24, 8), "redux_up.bias": (24,),
                                                              "redux_down.weight": (8, 24), "redux_down.bias": (8,)})
    elif case == "kontext":
        path = root / "FLUX.1-Kontext-dev.safetensors"
        shutil.copy(tiny["file"], path)
    elif case == "diffusers":
        path = root / "diffusion_pytorch_model.safetensors"
        shutil.copy(tiny["folder"] / "transformer" / "diffusion_pytorch_model.safetensors", path)
    elif case == "lora":
        path = _write(root / "my_flux_lora.safetensors", {
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 32),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": (32, 4)})
    else:
        path = _write(root / "kohya_flux_lora.safetensors", {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 32),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (96, 4),
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": ()})
    with pytest.raises(StudioError, match=says) as err:
        flux_kind(_shapes(path), path.name)
    assert path.name in str(err.value)
    with pytest.raises(StudioError, match=says):
        load_flux_single_file(path, components=str(tiny["folder"]))


def test_incomplete_file_is_refused(tiny):
    sd = load_file(tiny["file"])
    del sd["single_blocks.0.linear2.weight"]
    path = tiny["root"] / "truncated.safetensors"
    save_file(sd, str(path))
    with pytest.raises(StudioError, match="missing transformer weights"):
        load_flux_single_file(path, components=str(tiny["folder"]))


def test_not_a_flux_file_is_refused(tiny):
    path = _write(tiny["root"] / "sd15.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)})
    with pytest.raises(StudioError, match="not a Flux.1 transformer"):
        load_flux_single_file(path, components=str(tiny["folder"]))


# ---------------------------------------------------------------------------------------- BFL layout, converter

def _narrow_full_width(num_layers=2, num_single_layers=2, guidance=True):
    """A diffusers-layout FLUX.1 state dict with the real row counts (3072-wide blocks, the 21504-row linear1) but 2
    columns: diffusers' converter splits and swaps along dim 0 only, so this checks it at full width in a few MB."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=num_layers, num_single_layers=num_single_layers,
                                       guidance_embeds=guidance)
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn((v.shape[0], 2) if v.ndim == 2 else (v.shape[0],), generator=g)
            for k, v in model.state_dict().items()}


def _assert_equal_dicts(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("guidance", [True, False])
def test_bfl_writer_inverts_diffusers_converter_at_full_width(guidance):
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert

    sd = _narrow_full_width(guidance=guidance)
    bfl = transformer_to_bfl(sd)
    assert bfl["single_blocks.0.linear1.weight"].shape[0] == 3 * 3072 + 12288
    assert bfl["double_blocks.1.img_attn.qkv.weight"].shape[0] == 3 * 3072
    assert ("guidance_in.in_layer.weight" in bfl) is guidance
    consumed = dict(bfl)
    _assert_equal_dicts(convert(consumed), sd)
    assert not consumed  # the converter popped every tensor the writer made: no stray names
    comfy = transformer_to_bfl(sd, "model.diffusion_model.")
    _assert_equal_dicts(convert(comfy), sd)
    _assert_equal_dicts(bfl_to_diffusers(dict(bfl)), sd)  # Studio's any-width converter agrees with diffusers'


def test_bfl_round_trip_at_tiny_width(ref):
    sd = ref.transformer.state_dict()
    _assert_equal_dicts(bfl_to_diffusers(transformer_to_bfl(sd)), sd)


# -------------------------------------------------------------------------------------------- shipped configs

def test_shipped_configs_build_the_published_models():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    def count(model):
        return sum(p.numel() for p in model.parameters())

    sizes = {}
    for kind in ("dev", "schnell"):
        folder = CONFIG_ROOT / f"flux1-{kind}"
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "FluxPipeline"
        assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
        assert not list(folder.rglob("*.safetensors")) and not (folder / "tokenizer").exists()
        with torch.device("meta"):
            transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder / "transformer"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            clip = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
            t5 = T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_2"))
        sizes[kind] = count(transformer)
        assert transformer.config.guidance_embeds is (kind == "dev")
        assert (count(vae), count(clip), count(t5)) == (83_819_683, 123_060_480, 4_762_310_656)
        assert vae.config.latent_channels == 16 and vae.config.shift_factor == 0.1159
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler").config
        assert scheduler.use_dynamic_shifting is (kind == "dev")
        assert scheduler.shift == (3.0 if kind == "dev" else 1.0)
        # The published transformer's own names and shapes are a Flux.1 file of its kind.
        assert flux_kind({k: tuple(v.shape) for k, v in transformer_to_bfl(transformer.state_dict()).items()},
                         f"flux1-{kind}.safetensors") == kind
    assert sizes["dev"] == 11_901_408_320
    assert sizes["dev"] - sizes["schnell"] == 256 * 3072 + 3072 * 3072 + 2 * 3072  # the guidance embedder
