"""Write a first caption for every image in a folder — the Dataset tab's Auto-label: a sentence (BLIP, or a VLM
such as Qwen2.5-VL, Florence-2 or JoyCaption) and/or tags (CLIP, or a WD14 tagger for anime and character sets).

Existing captions (metadata.csv or .txt sidecars) are kept unless --overwrite, so hand edits are never lost. Examples:
  python tools/auto_label.py --input data/cyberpunk_art --output data/cyberpunk_art/metadata.csv --trigger cyb3rp
  python tools/auto_label.py --input data/my_oc --mode wd14 --character-threshold 0.7
  python tools/auto_label.py --input data/photos --mode vlm --vlm-model Qwen/Qwen2.5-VL-3B-Instruct \
      --instruction "Describe the lighting and the composition in one sentence."
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
    parser.add_argument("--mode", default=cap.DEFAULT_MODE, choices=cap.MODES,
                        help="; ".join(f"{name}: {mode.title}" for name, mode in cap.MODES.items()) +
                        " (default: %(default)s)")
    parser.add_argument("--format", default="csv", choices=cap.FORMATS, help="csv: metadata.csv; txt: kohya sidecars")
    parser.add_argument("--overwrite", action="store_true", help="replace existing captions too")
    parser.add_argument("--trigger", default="", help="word put first in every new caption")
    parser.add_argument("--max-tags", type=int, default=cap.DEFAULT_MAX_TAGS, help="CLIP tags per image")
    parser.add_argument("--threshold", type=float, default=cap.DEFAULT_THRESHOLD, help="min CLIP cosine similarity")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    parser.add_argument("--clip-backend", default="clip", choices=cap.CLIP_BACKENDS, help="see --backends")
    parser.add_argument("--clip-model", help="hub id or local folder (default per backend, see --backends)")
    parser.add_argument("--blip-model", help=f"hub id or local folder (default {cap.DEFAULT_BLIP})")
    parser.add_argument("--vocabulary", default=cap.VOCAB_DIR, help="folder of tag .txt files (default: the project's)")
    parser.add_argument("--wd14-model", help=f"WD14 tagger: hub id or folder with model.onnx + selected_tags.csv "
                                             f"(default {cap.DEFAULT_WD14})")
    parser.add_argument("--general-threshold", type=float, default=cap.DEFAULT_GENERAL_THRESHOLD,
                        help="min WD14 score of a general tag (default: %(default)s)")
    parser.add_argument("--character-threshold", type=float, default=cap.DEFAULT_CHARACTER_THRESHOLD,
                        help="min WD14 score of a character tag (default: %(default)s)")
    parser.add_argument("--rating-tags", action="store_true", help="put the WD14 rating tag first (dropped by default)")
    parser.add_argument("--vlm-model", help=f"image-text-to-text model: hub id or folder (default {cap.DEFAULT_VLM})")
    parser.add_argument("--instruction", default=cap.DEFAULT_INSTRUCTION,
                        help="what the VLM is asked about each image (default: %(default)s); "
                             "Florence-2 takes a task prompt such as <DETAILED_CAPTION>")
    parser.add_argument("--vlm-max-tokens", type=int, default=cap.DEFAULT_MAX_TOKENS,
                        help="the longest VLM caption, in tokens (default: %(default)s)")
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
        models = cap.LabelModels(
            blip_model=args.blip_model, clip_backend=args.clip_backend, clip_model=args.clip_model,
            vocabulary=args.vocabulary, threshold=args.threshold, max_tags=args.max_tags, wd14_model=args.wd14_model,
            general_threshold=args.general_threshold, character_threshold=args.character_threshold,
            rating_tags=args.rating_tags, vlm_model=args.vlm_model, instruction=args.instruction,
            vlm_max_tokens=args.vlm_max_tokens)
        report = cap.auto_label(args.input, args.output, mode=args.mode, output_format=args.format,
                                overwrite=args.overwrite, trigger_word=args.trigger, batch_size=args.batch_size,
                                device=args.device, models=models, progress=_tqdm_progress())
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
