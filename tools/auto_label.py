"""Write a first caption for every image in a folder (BLIP sentence and/or CLIP tags) — the Dataset tab's Auto-label.

Existing captions are kept unless --overwrite, so hand edits are never lost. Example:
  python tools/auto_label.py --input data/cyberpunk_art --output data/cyberpunk_art/metadata.csv --trigger cyb3rp
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python tools/auto_label.py` from anywhere

from studio.cli import configure_environment, exit_on_user_error  # noqa: E402
from studio.data import captioning as cap  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="folder of images (.jpg .jpeg .png .webp .bmp)")
    parser.add_argument("--output", help="metadata.csv to write (default INPUT/metadata.csv); with --format txt, "
                                         "the folder for the sidecars (default INPUT)")
    parser.add_argument("--mode", default=cap.DEFAULT_MODE, choices=cap.MODES, help="default: %(default)s")
    parser.add_argument("--format", default="csv", choices=cap.FORMATS, help="csv: metadata.csv; txt: kohya sidecars")
    parser.add_argument("--overwrite", action="store_true", help="replace existing captions too")
    parser.add_argument("--trigger", default="", help="word put first in every new caption")
    parser.add_argument("--max-tags", type=int, default=cap.DEFAULT_MAX_TAGS)
    parser.add_argument("--threshold", type=float, default=cap.DEFAULT_THRESHOLD, help="min CLIP cosine similarity")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    parser.add_argument("--clip-backend", default="clip", choices=cap.CLIP_BACKENDS, help="see --backends")
    parser.add_argument("--clip-model", help="hub id or local folder (default per backend, see --backends)")
    parser.add_argument("--blip-model", help=f"hub id or local folder (default {cap.DEFAULT_BLIP})")
    parser.add_argument("--vocabulary", default=cap.VOCAB_DIR, help="folder of tag .txt files (default: the project's)")
    parser.add_argument("--backends", action="store_true", help="list the backends usable here and exit")
    args = parser.parse_args(argv)
    if args.backends:
        for name, (usable, reason) in cap.available_backends().items():
            print(f"{name:<10} {'yes' if usable else 'no ':<4} {reason}")
        return 0
    if not args.input:
        parser.error("--input is required")
    configure_environment()
    with exit_on_user_error():
        report = cap.auto_label(args.input, args.output, mode=args.mode, output_format=args.format,
                                overwrite=args.overwrite, trigger_word=args.trigger, max_tags=args.max_tags,
                                threshold=args.threshold, batch_size=args.batch_size, device=args.device,
                                clip_backend=args.clip_backend, clip_model=args.clip_model,
                                blip_model=args.blip_model, vocabulary=args.vocabulary, progress=_tqdm_progress())
    print(report.summary())
    return 0


def _tqdm_progress():
    """A progress callback drawing a tqdm bar in images, with tqdm's own images/s."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int, images_per_s: float) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, unit="img", dynamic_ncols=True)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


if __name__ == "__main__":
    sys.exit(main())
