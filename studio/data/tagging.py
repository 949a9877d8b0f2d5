"""CLIP tagging without the model: the tag vocabulary the project ships, and ranking phrases against an image.

The vocabulary is plain text in `studio/data/tag_vocab/*.txt` (subjects, styles, media, lighting, colours,
composition, quality), one phrase per line, so users can add the words their dataset needs. Ranking is a pure
function of embeddings, so the scoring is tested on embeddings whose answer is known.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from studio.errors import StudioError

VOCAB_DIR = Path(__file__).resolve().parent / "tag_vocab"


def load_vocabulary(folder: str | Path = VOCAB_DIR) -> list[str]:
    """Every phrase in the folder's .txt files in file and line order; blank lines, `#` comments, repeats skipped."""
    folder = Path(folder)
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    phrases = []
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            phrase = line.strip()
            if phrase and not phrase.startswith("#"):
                phrases.append(phrase)
    phrases = list(dict.fromkeys(phrases))
    if not phrases:
        raise StudioError(f"The tag vocabulary folder {folder} holds no phrases. Put .txt files there with one phrase "
                          f"per line (the project's own are in {VOCAB_DIR}).")
    return phrases


def rank_tags(image_embeds: torch.Tensor, text_embeds: torch.Tensor, phrases: list[str], threshold: float,
              max_tags: int) -> list[list[str]]:
    """For each image, up to `max_tags` phrases whose cosine similarity to it is at least `threshold`, best first.

    image_embeds: (images, dim); text_embeds: (len(phrases), dim), in the same embedding space (CLIP's projection).
    Cosine similarity rather than softmax probability: a probability over a few hundred phrases depends on how many
    near-synonyms the vocabulary holds, while a cosine threshold means the same whatever the user adds.
    """
    if max_tags <= 0:
        return [[] for _ in range(len(image_embeds))]
    similarity = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(text_embeds.float(), dim=-1).T
    scores, indices = similarity.topk(min(max_tags, len(phrases)), dim=-1)
    return [[phrases[i] for score, i in zip(row_scores.tolist(), row_indices.tolist()) if score >= threshold]
            for row_scores, row_indices in zip(scores, indices)]
