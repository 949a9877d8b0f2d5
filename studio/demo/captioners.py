"""Tiny captioning models for auto-labelling, built locally in seconds (the ONNX export takes the longest), offline.

CLIP, BLIP and the VLM are the real transformers classes with processors saved beside them, so `from_pretrained` and
`AutoProcessor.from_pretrained` load them offline exactly as they load `openai/clip-vit-large-patch14`,
`Salesforce/blip-image-captioning-base` or a LLaVA-style VLM such as JoyCaption; their outputs are noise. The WD14
tagger is a real ONNX file in the wd-v3 layout (`model.onnx` + `selected_tags.csv`) whose scores are set by hand, so
tests can assert what each threshold keeps (TINY_TAGS). Exporting it needs `onnx` and `onnxscript`
(requirements-dev.txt).
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import torch
from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil,
                          BlipProcessor, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor,
                          CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

from studio.demo.tokenizers import build_clip_tokenizer, build_llama_tokenizer

IMAGE_SIZE = 32
HIDDEN = 32

# BLIP's decoder vocabulary: BERT specials, BLIP's "[DEC]" start token, caption words and punctuation — the comma
# and quote let random captions exercise CSV quoting.
BLIP_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "red", "green", "blue", "yellow", "white", "black",
              "circle", "square", "shape", "photo", "painting", "drawing", "picture", "background", "flat", "colour",
              "city", "night", "neon", "street", "portrait", "woman", "man", "cat", "dog", ",", '"', "."]
BLIP_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def _encoder_dims(**extra) -> dict:
    return dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **extra)


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A CLIPModel (32 px images, 32-d embeddings) with the byte-level CLIP tokenizer and a PIL image processor."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(out_dir)
    config = CLIPConfig(
        text_config=_encoder_dims(vocab_size=len(tokenizer), max_position_embeddings=77,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id),
        vision_config=_encoder_dims(image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=HIDDEN,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    CLIPModel(config).save_pretrained(out_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    shutil.rmtree(out_dir / "_src")
    return out_dir


def build_tiny_blip(out_dir: str | Path, seed: int = 0) -> Path:
    """A BlipForConditionalGeneration (32 px images) with a BERT tokenizer on a hand-written caption vocabulary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab_file = out_dir / "vocab.txt"
    vocab_file.write_text("\n".join(BLIP_SPECIALS + BLIP_WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(str(vocab_file), bos_token="[DEC]")
    vocab_file.unlink()  # save_pretrained writes the tokenizer's own files
    ids = tokenizer.convert_tokens_to_ids
    config = BlipConfig(
        text_config=_encoder_dims(vocab_size=len(tokenizer), encoder_hidden_size=HIDDEN, max_position_embeddings=64,
                                  bos_token_id=ids("[DEC]"), sep_token_id=ids("[SEP]"), eos_token_id=ids("[SEP]"),
                                  pad_token_id=ids("[PAD]")),
        vision_config=_encoder_dims(image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=HIDDEN, image_text_hidden_size=HIDDEN,
    )
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    BlipForConditionalGeneration(config).save_pretrained(out_dir)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


# --- WD14-style tagger -----------------------------------------------------------------------------------------------

TAGGER_SIZE = 32  # the ONNX input is fixed at 32x32: a caller that does not resize to the model's shape fails
# tag → (selected_tags.csv category, its score on a pure red, green and blue image). The model is a sigmoid over the
# image's mean colour, so a test knows each score: e.g. on red, "red_theme" 0.9 passes the general threshold 0.35,
# "crimson_knight_(tiny)" 0.95 passes the character threshold 0.85 but "rose_mage_(tiny)" 0.6 does not.
TINY_TAGS = {
    "general": (9, 0.8, 0.8, 0.8), "explicit": (9, 0.1, 0.1, 0.1),
    "red_theme": (0, 0.9, 0.05, 0.05), "blue_theme": (0, 0.05, 0.05, 0.9), "solo": (0, 0.5, 0.5, 0.5),
    "^_^": (0, 0.4, 0.4, 0.4), "simple_background": (0, 0.3, 0.3, 0.3),
    "crimson_knight_(tiny)": (4, 0.95, 0.02, 0.02), "rose_mage_(tiny)": (4, 0.6, 0.02, 0.02),
}


class _MeanColourTagger(torch.nn.Module):
    """wd-v3's interface (NHWC float32 BGR 0..255 in, one sigmoid score per tag out) over the mean colour."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, len(TINY_TAGS), bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(pixels.mean(dim=(1, 2)) / 255))


def build_tiny_wd14(out_dir: str | Path) -> Path:
    """`model.onnx` (exported with torch, dynamic batch) and `selected_tags.csv`, as in SmilingWolf's repos."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _MeanColourTagger().eval()
    with torch.no_grad():  # a pure colour is one-hot in BGR order: its score's logit is that channel's weight
        logits = [[math.log(p / (1 - p)) for p in (blue, green, red)] for _, red, green, blue in TINY_TAGS.values()]
        model.head.weight.copy_(torch.tensor(logits))
    example = torch.zeros(2, TAGGER_SIZE, TAGGER_SIZE, 3)
    torch.onnx.export(model, (example,), out_dir / "model.onnx", input_names=["input"], output_names=["output"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False)
    with open(out_dir / "selected_tags.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        writer.writerows([i, name, category, 1000 - i] for i, (name, (category, *_)) in enumerate(TINY_TAGS.items()))
    return out_dir


# --- image-text-to-text VLM ------------------------------------------------------------------------------------------

# A LLaVA chat template (the JoyCaption layout): structured content, the image where its block stands.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
VLM_CORPUS = [" ".join(BLIP_WORDS[i:i + 6]) for i in range(0, len(BLIP_WORDS), 3)] + [
    "Describe this image in one sentence for training a LoRA.", "A red circle on a white background.",
]


def build_tiny_vlm(out_dir: str | Path, seed: int = 0) -> Path:
    """A LlavaForConditionalGeneration (CLIP vision tower, 32 px, 16 image tokens; a 2-layer Llama) with a
    LlavaProcessor: a locally trained byte-level BPE with an `<image>` token and VLM_CHAT_TEMPLATE."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_llama_tokenizer(VLM_CORPUS * 4)
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]})
    ids = tokenizer.convert_tokens_to_ids
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**_encoder_dims(image_size=IMAGE_SIZE, patch_size=8)),
                         text_config=text, image_token_index=ids("<image>"), image_seq_length=16)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=VLM_CHAT_TEMPLATE)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
