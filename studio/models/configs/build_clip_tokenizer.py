"""Regenerate the CLIP tokenizer files shipped under configs/*/tokenizer*/ (maintainer tool, not used at run time).

The CLIP BPE (OpenAI's `bpe_simple_vocab_16e6.txt.gz`) ships inside the open_clip_torch wheel. Fetch it without
installing anything:

    pip download --no-deps open_clip_torch -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/oc
    python studio/models/configs/build_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

The vocabulary is built exactly as CLIP's SimpleTokenizer builds it: the 256 byte symbols, the same with `</w>`, one
token per merge (the first 48 894 merges), then `<|startoftext|>` and `<|endoftext|>` — 49 408 tokens, the
vocab.json / merges.txt pair that Hugging Face's CLIPTokenizer reads.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # run as a script from anywhere: the repo root holds the studio package

from studio.demo.tokenizers import bytes_to_unicode  # noqa: E402
TOKENIZER_DIRS = [HERE / "sd15" / "tokenizer", HERE / "sdxl" / "tokenizer", HERE / "sdxl" / "tokenizer_2"]
N_MERGES = 49152 - 256 - 2  # CLIP's SimpleTokenizer: merges = lines[1 : 49152 - 256 - 2 + 1]


def clip_vocab_and_merges(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1:N_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != 49408:
        raise SystemExit(f"expected 49408 tokens, got {len(vocab)} — is this CLIP's bpe_simple_vocab_16e6.txt.gz?")
    return vocab, merges


def main(bpe_gz: str) -> None:
    vocab, merges = clip_vocab_and_merges(Path(bpe_gz))
    vocab_text = json.dumps(vocab, ensure_ascii=False)
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    for d in TOKENIZER_DIRS:
        d.mkdir(parents=True, exist_ok=True)
        (d / "vocab.json").write_text(vocab_text, encoding="utf-8")
        (d / "merges.txt").write_text(merges_text, encoding="utf-8")
        print(f"wrote {d}")


if __name__ == "__main__":
    main(sys.argv[1])
