"""WD14-style taggers (SmilingWolf's wd-v3 family): an ONNX classifier over Danbooru tags, run with onnxruntime.

A tagger is a hub repo or a local folder holding `model.onnx` and `selected_tags.csv` (tag_id,name,category,count;
category 0 general, 4 character, 9 rating). The model takes NHWC float32 BGR pixels in 0..255, square, at the size
of its input shape, and gives one sigmoid score per tag. Preprocessing and tag names follow SmilingWolf's wd-tagger.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from studio.data.label_models import missing_model_error
from studio.errors import StudioError

DEFAULT_WD14 = "SmilingWolf/wd-eva02-large-tagger-v3"
MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
GENERAL, CHARACTER, RATING = 0, 4, 9
DEFAULT_GENERAL_THRESHOLD, DEFAULT_CHARACTER_THRESHOLD = 0.35, 0.85
# Tags whose underscores are part of the face they draw (wd-tagger's list); every other tag reads "long hair".
KAOMOJI = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
           "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}


@dataclass(frozen=True)
class TagTable:
    names: list[str]  # as written into captions
    general: np.ndarray  # indices of the tags in each category
    character: np.ndarray
    rating: np.ndarray


def caption_tag(name: str) -> str:
    """A Danbooru tag as captions write it: underscores become spaces, except in kaomoji such as ^_^."""
    return name if name in KAOMOJI else name.replace("_", " ")


def read_tag_table(path: Path) -> TagTable:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise StudioError(f"{path} is not a WD14 tag list: it needs the header tag_id,name,category,count and one "
                          "row per tag. Use the selected_tags.csv that comes with the model.")
    categories = np.array([int(row["category"]) for row in rows])
    return TagTable([caption_tag(row["name"]) for row in rows], *(np.flatnonzero(categories == category)
                                                                  for category in (GENERAL, CHARACTER, RATING)))


def tagger_files(model_id: str) -> tuple[Path, Path]:
    """(model.onnx, selected_tags.csv) from a local folder, or from the hub (cache first, like the other models)."""
    folder = Path(model_id).expanduser()
    if folder.is_dir():
        missing = [name for name in (MODEL_FILE, TAGS_FILE) if not (folder / name).is_file()]
        if missing:
            raise missing_model_error("WD14", model_id, FileNotFoundError(f"no {' or '.join(missing)} in it"))
        return folder / MODEL_FILE, folder / TAGS_FILE
    from huggingface_hub import hf_hub_download
    try:
        return tuple(Path(hf_hub_download(model_id, name)) for name in (MODEL_FILE, TAGS_FILE))
    except (OSError, ValueError) as exc:  # not cached and offline, no such repo or file, or a malformed id
        raise missing_model_error("WD14", model_id, exc) from None


def to_model_input(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) float32 BGR in 0..255: the RGB image centred on a white square, then resized (bicubic)."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), "white")
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


class Wd14Tagger:
    """Tags above the general / character thresholds, best first (characters before general tags); the most likely
    rating tag first only with `rating_tags` (ratings describe content, not what a LoRA should learn)."""

    def __init__(self, model_id: str, general_threshold: float, character_threshold: float, rating_tags: bool,
                 use_cuda: bool):
        import onnxruntime

        model_path, tags_path = tagger_files(model_id)
        self.tags = read_tag_table(tags_path)
        self.general_threshold, self.character_threshold = general_threshold, character_threshold
        self.rating_tags = rating_tags
        providers = [p for p in ("CUDAExecutionProvider",) if use_cuda and p in onnxruntime.get_available_providers()]
        options = onnxruntime.SessionOptions()
        # onnxruntime's threads otherwise spin-wait after each batch, taking the cores a VLM run beside it needs
        # (vlm+wd14 ran 10x slower than vlm alone on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(str(model_path), options,
                                                        providers=[*providers, "CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid files
            raise StudioError(f"{model_path} cannot be loaded as an ONNX model ({str(exc).splitlines()[0]}). "
                              f"Download the tagger again or give another one.") from None
        self.input = self.session.get_inputs()[0]
        self.size = self._input_size(model_path)
        self._check_outputs(model_path, tags_path)

    def __call__(self, images: list[Image.Image]) -> list[list[str]]:
        return [self._tags_of(row) for row in self.scores(images)]

    def scores(self, images: list[Image.Image]) -> np.ndarray:
        """(images, tags) sigmoid scores; a model exported with a fixed batch of 1 is run one image at a time."""
        pixels = np.stack([to_model_input(image, self.size) for image in images])
        fixed_single = self.input.shape[0] == 1
        chunks = np.split(pixels, len(pixels)) if fixed_single else [pixels]
        return np.concatenate([self.session.run(None, {self.input.name: chunk})[0] for chunk in chunks])

    def _tags_of(self, scores: np.ndarray) -> list[str]:
        tags = self._above(scores, self.tags.character, self.character_threshold) + \
            self._above(scores, self.tags.general, self.general_threshold)
        if self.rating_tags and len(self.tags.rating):
            tags.insert(0, self.tags.names[self.tags.rating[np.argmax(scores[self.tags.rating])]])
        return tags

    def _above(self, scores: np.ndarray, indices: np.ndarray, threshold: float) -> list[str]:
        kept = indices[scores[indices] > threshold]
        return [self.tags.names[i] for i in kept[np.argsort(-scores[kept], kind="stable")]]

    def _input_size(self, model_path: Path) -> int:
        shape = self.input.shape  # (batch, height, width, 3)
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise StudioError(f"{model_path} takes input of shape {shape}, not the square NHWC colour images of a "
                              "WD14 tagger (batch, size, size, 3). Give a wd-v3 style tagger.")
        return shape[1]

    def _check_outputs(self, model_path: Path, tags_path: Path) -> None:
        width = self.session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(self.tags.names):
            raise StudioError(f"{model_path} scores {width} tags but {tags_path} lists {len(self.tags.names)}: "
                              "the two files come from different taggers. Keep the pair from one repo.")
