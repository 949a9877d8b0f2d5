"""Tiny random-weight CLIP and BLIP models for auto-labelling, built locally in well under a second, no download.

They are the real transformers classes with processors saved beside them, so `CLIPModel.from_pretrained`,
`BlipForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` load them offline exactly as they
load `openai/clip-vit-large-patch14` and `Salesforce/blip-image-captioning-base`. Their outputs are noise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil,
                          BlipProcessor, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor)

from studio.demo.tokenizers import build_clip_tokenizer

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
