"""Check an image dataset before training — the Dataset tab's health check.

Prints what training would refuse (exit code 2), and warnings that do not stop it (exit code 0): near-duplicate,
blurry and low-resolution images, caption coverage and length, tag frequencies and the trigger word, the bucket
distribution, and the steps and time for the config. Example:
  python tools/check_dataset.py data/my_style --config my.yaml
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python tools/check_dataset.py` from anywhere

from studio.cli import configure_environment, exit_on_user_error  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the dataset folder (images with metadata.csv or .txt captions)")
    parser.add_argument("--config", help="the run's YAML config: its resolution, buckets, batch, trigger word and "
                                         "steps (its train_data_dir is replaced by FOLDER); default: the defaults")
    args = parser.parse_args(argv)
    configure_environment()
    with exit_on_user_error():
        from studio.data.health import check_dataset
        from studio.data.health_text import report_markdown
        report = check_dataset(args.folder, **_run_settings(args.folder, args.config), progress=_tqdm_progress())
    print(report_markdown(report))
    return 2 if report.blocking else 0


def _run_settings(folder: str, config: str | None) -> dict:
    """The fitted config as train.py makes it, its family, and where its speed may have been measured."""
    if not config:
        return {}
    from studio.config import read_yaml
    from studio.hardware import detect
    from studio.plan.fit import fit_config
    hardware = detect()
    fitted = fit_config({**read_yaml(config), "train_data_dir": folder}, hardware)
    return {"cfg": fitted.cfg, "family": fitted.family, "device": hardware.name,
            "runs_dir": Path(fitted.cfg.output_dir).parent}  # the runs beside this one


def _tqdm_progress():
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, unit="img", desc="Checking", dynamic_ncols=True, leave=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


if __name__ == "__main__":
    sys.exit(main())
