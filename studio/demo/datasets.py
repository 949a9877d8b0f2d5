"""Small generated datasets: coloured shapes with captions (image task) and question/answer chats (LLM task)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from studio.data.captions import write_csv_captions

# The colours and shapes the demo base model draws (tools/pretrain_demo.py pretrains it on them).
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ["circle", "square", "triangle"]
BACKGROUND = (245, 245, 245)
# What the demo LoRA teaches (build_demo_images): a colour the base model cannot draw, so a strength sweep shows it.
TAUGHT_COLOUR = "pink"
PALETTE = {**COLOURS, TAUGHT_COLOUR: (250, 110, 200)}

DEMO_QA = [
    ("What is the capital of France?", "Paris."),
    ("What colour is the sky?", "Blue."),
    ("How many legs does a cat have?", "Four."),
    ("What do bees make?", "Honey."),
    ("What is two plus two?", "Four."),
    ("Which planet is red?", "Mars."),
]
SYSTEM_PROMPT = "You are a helpful assistant."


def draw_shape(shape: str, colour: str, size: tuple[int, int], scale: float = 0.6,
               centre: tuple[float, float] = (0.5, 0.5)) -> Image.Image:
    """A flat `colour` (a PALETTE name) `shape` spanning `scale` of the shorter side, at `centre` (fractions)."""
    img = Image.new("RGB", size, BACKGROUND)
    w, h = size
    r, x, y = scale * min(w, h) / 2, centre[0] * w, centre[1] * h
    draw, fill = ImageDraw.Draw(img), PALETTE[colour]
    if shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    else:
        (draw.ellipse if shape == "circle" else draw.rectangle)((x - r, y - r, x + r, y + r), fill=fill)
    return img


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}, flat colour, white background"


def build_demo_images(out_dir: str | Path) -> Path:
    """Eight 96 px images of TAUGHT_COLOUR shapes (sizes and places vary) with a metadata.csv of captions. Square, as
    the previews are: trained on other aspect ratios the tiny model learns the colour less surely at 64×64."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i in range(8):
        shape = SHAPES[i % len(SHAPES)]
        name = f"{TAUGHT_COLOUR}_{shape}_{i}.png"
        scale, centre = 0.5 + 0.05 * (i % 4), (0.45 + 0.05 * (i % 3), 0.55 - 0.05 * (i % 3))
        draw_shape(shape, TAUGHT_COLOUR, (96, 96), scale, centre).save(out_dir / name)
        captions[name] = caption(TAUGHT_COLOUR, shape)
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
