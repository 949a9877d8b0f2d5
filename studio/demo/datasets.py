"""Small generated datasets: coloured shapes with captions (image task) and question/answer chats (LLM task)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from studio.data.captions import write_csv_captions

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ["circle", "square"]
# Mixed aspect ratios so aspect-ratio bucketing has something to do.
SIZES = [(96, 96), (128, 96), (96, 128)]

DEMO_QA = [
    ("What is the capital of France?", "Paris."),
    ("What colour is the sky?", "Blue."),
    ("How many legs does a cat have?", "Four."),
    ("What do bees make?", "Honey."),
    ("What is two plus two?", "Four."),
    ("Which planet is red?", "Mars."),
]
SYSTEM_PROMPT = "You are a helpful assistant."


def draw_shape(shape: str, colour: str, size: tuple[int, int]) -> Image.Image:
    img = Image.new("RGB", size, (245, 245, 245))
    w, h = size
    box = (w * 0.2, h * 0.2, w * 0.8, h * 0.8)
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return img


def build_demo_images(out_dir: str | Path) -> Path:
    """Eight images (4 colours × 2 shapes) with a metadata.csv of captions."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        name = f"{colour}_{shape}.png"
        draw_shape(shape, colour, SIZES[i % len(SIZES)]).save(out_dir / name)
        captions[name] = f"a {colour} {shape}, flat colour, white background"
    write_csv_captions(out_dir / "metadata.csv", captions)
    return out_dir


def build_demo_chat(out_dir: str | Path) -> Path:
    """A chat dataset in the messages format (`{"messages": [{role, content}, ...]}` per line)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "chat.jsonl", "w", encoding="utf-8") as fh:
        for q, a in DEMO_QA:
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q},
                        {"role": "assistant", "content": a}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return out_dir
