"""The models auto-labelling runs: CLIP (transformers or open_clip) for tags, BLIP for sentences (WD14 taggers and
VLMs have their own modules, studio.data.wd14 and studio.data.vlm, and load through the helpers here).

Every model and processor is loaded through `load_pretrained`, which turns a model that is not there into one
StudioError saying what to download and where. Each class loads once and then takes a whole batch of images per call.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, BlipForConditionalGeneration, CLIPModel

from studio.data.tagging import rank_tags
from studio.errors import StudioError
from studio.hub_reach import hub_reachable

DEFAULT_CLIP = {"clip": "openai/clip-vit-large-patch14", "open_clip": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}
DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"
TEXT_BATCH = 256  # vocabulary phrases per text forward pass
BLIP_GENERATION = {"num_beams": 3, "max_new_tokens": 30, "min_length": 5}  # the BLIP authors' captioning settings


def available_backends() -> dict[str, tuple[bool, str]]:
    """Backend name → (usable here, why / what it is). 'clip', 'open_clip' and 'wd14' tag; 'blip' and 'vlm' write
    sentences."""
    return {
        "clip": (True, f"transformers CLIPModel (default {DEFAULT_CLIP['clip']})"),
        "open_clip": _open_clip_status(),
        "blip": (True, f"transformers BlipForConditionalGeneration (default {DEFAULT_BLIP})"),
        "wd14": _onnxruntime_status(),
        "vlm": (True, "transformers AutoModelForImageTextToText: Qwen2.5-VL, Qwen3-VL, SmolVLM, LLaVA (JoyCaption), "
                      "Florence-2 (florence-community/...)"),
    }


@functools.cache
def _onnxruntime_status() -> tuple[bool, str]:
    try:
        import onnxruntime
    except ImportError as exc:
        return False, f"onnxruntime cannot be imported ({exc}). Install it: pip install -r requirements.txt"
    return True, f"onnxruntime {onnxruntime.__version__} (SmilingWolf wd-v3 taggers: model.onnx + selected_tags.csv)"


@functools.cache
def _open_clip_status() -> tuple[bool, str]:
    try:
        import open_clip  # noqa: F401
    except Exception as exc:  # ImportError when absent; a CUDA-only torchvision raises RuntimeError on a CPU machine
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, (f"open_clip cannot be imported ({reason}). It is optional and for GPU machines only: "
                       "pip install -c constraints.txt -r requirements-extras.txt")
    return True, f"open_clip (LAION ViT-H-14 / ViT-bigG-14; default {DEFAULT_CLIP['open_clip']})"


def load_pretrained(cls, model_id: str, what: str, **kwargs):
    """`cls.from_pretrained(model_id)`; a model that is not there becomes one StudioError saying how to get it.

    Every model and processor of a run is loaded through here, so a test can count the loads.
    """
    if not Path(model_id).expanduser().exists() and not hub_reachable():
        kwargs = {**kwargs, "local_files_only": True}  # offline: the cache, or the message below at once
    try:
        return cls.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as exc:  # transformers: OSError for missing files, ValueError for a wrong folder
        raise missing_model_error(what, model_id, exc) from None
    except ImportError as exc:  # e.g. Qwen-VL's video processor needs torchvision, which CPU installs leave out
        reason = " ".join(str(exc).split()).split(". ")[0].rstrip(".") or type(exc).__name__  # its first sentence
        raise StudioError(f"The {what} model '{model_id}' needs a package that is not installed here: {reason}. "
                          "On a GPU machine, install the extras (pip install -c constraints.txt -r "
                          f"requirements-extras.txt); or pick a {what} model that does not need it.") from None


def missing_model_error(what: str, model_id: str, exc: Exception) -> StudioError:
    path = Path(model_id).expanduser()
    if path.is_dir():
        return StudioError(f"{model_id} does not hold a {what} model ({str(exc).splitlines()[0]}). Give the folder "
                           "that holds its config and weights, or a Hugging Face model id.")
    if path.is_absolute() or model_id.startswith((".", "~")) or model_id.count("/") > 1:
        return StudioError(f"The {what} model folder {model_id} does not exist. Give an existing folder or a "
                           "Hugging Face model id.")
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import HFValidationError
    if isinstance(exc, ValueError) and not isinstance(exc, HFValidationError):  # found, but of another kind
        return StudioError(f"'{model_id}' is not a {what} model this version of transformers can load "
                           f"({str(exc).splitlines()[0]}). Give another {what} model id or folder.")
    return StudioError(f"The {what} model '{model_id}' is not downloaded: it is not in the Hugging Face cache "
                       f"({HF_HUB_CACHE}) and could not be fetched (offline?). Download it once with "
                       f"`hf download {model_id}`, which puts it in that cache, or give the local folder of a "
                       f"downloaded {what} model instead.")


class TransformersClip:
    """CLIP through transformers' CLIPModel (OpenAI CLIP and any CLIPModel checkpoint)."""

    def __init__(self, model_id: str, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.model = load_pretrained(CLIPModel, model_id, "CLIP", dtype=dtype).to(device).eval()
        self.processor = load_pretrained(AutoProcessor, model_id, "CLIP")

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        return self.model.get_text_features(**tokens).pooler_output


class OpenClip:
    """LAION CLIP models through open_clip (optional: needs torchvision, so only on GPU installs)."""

    def __init__(self, model_id: str, device: torch.device, dtype: torch.dtype):
        import open_clip

        self.device, self.dtype = device, dtype
        name = f"local-dir:{model_id}" if Path(model_id).expanduser().is_dir() else f"hf-hub:{model_id}"
        precision = {torch.float16: "pure_fp16", torch.bfloat16: "pure_bf16"}.get(dtype, "fp32")
        try:
            # require_pretrained: without it, missing weights give a randomly initialised model and nonsense tags.
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                name, device=device, precision=precision, require_pretrained=True)
            self.tokenizer = open_clip.get_tokenizer(name)
        except (OSError, RuntimeError, ValueError) as exc:
            raise missing_model_error("open_clip", model_id, exc) from None
        self.model.eval()

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        return self.model.encode_image(pixels)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


class Tagger:
    """A CLIP encoder and the vocabulary's text embeddings, computed once per run (never per image)."""

    def __init__(self, encoder: TransformersClip | OpenClip, phrases: list[str], threshold: float, max_tags: int):
        self.encoder, self.phrases, self.threshold, self.max_tags = encoder, phrases, threshold, max_tags
        self.text_embeds = torch.cat([encoder.encode_texts(phrases[i:i + TEXT_BATCH])
                                      for i in range(0, len(phrases), TEXT_BATCH)])

    def __call__(self, images: list[Image.Image]) -> list[list[str]]:
        return rank_tags(self.encoder.encode_images(images), self.text_embeds, self.phrases, self.threshold,
                         self.max_tags)


class BlipCaptioner:
    """One sentence per image from BlipForConditionalGeneration."""

    def __init__(self, model_id: str, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.model = load_pretrained(BlipForConditionalGeneration, model_id, "BLIP", dtype=dtype).to(device).eval()
        self.processor = load_pretrained(AutoProcessor, model_id, "BLIP")

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        ids = self.model.generate(pixel_values=pixels, **BLIP_GENERATION)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]
