"""Tokenizers built locally (no download): a byte-level CLIP BPE and a byte-level BPE for the tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer, PreTrainedTokenizerFast

# A few common caption words become single tokens; everything else falls back to byte-level symbols.
CLIP_MERGE_WORDS = ["a", "an", "the", "of", "red", "green", "blue", "yellow", "circle", "square", "photo", "style",
                    "painting", "drawing", "portrait", "on", "in", "with", "white", "black", "background"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table (transformers v5 no longer exports it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build `word</w>` from its characters."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    while len(symbols) > 1:
        merges.append((symbols[0], symbols[1]))
        symbols = [symbols[0] + symbols[1]] + symbols[2:]
    return merges


def build_clip_tokenizer(out_dir: Path) -> CLIPTokenizer:
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in CLIP_MERGE_WORDS:
        for pair in _word_merges(word):
            if pair not in merges:
                merges.append(pair)
    vocab_list += ["".join(p) for p in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    src = out_dir / "_src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in merges) + "\n",
                                    encoding="utf-8")
    tok = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)
    return tok


def build_llama_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A ~400-token byte-level BPE trained on `corpus`, with role markers as special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast
