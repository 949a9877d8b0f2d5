"""Train a LoRA from a YAML config: `python train.py --config my.yaml` — the same code the studio's Train tab runs."""

import argparse
import signal
import sys
import threading

from studio.cli import configure_environment, exit_on_user_error, field_flags_help, tqdm_listener


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=field_flags_help())
    parser.add_argument("--config", required=True, help="YAML run config (see presets/ and README.md)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set max_train_steps=100 lora_rank=16")
    args = parser.parse_args(argv)
    configure_environment()

    from studio.config import load_config, overrides_from_pairs
    from studio.events import EventSink
    from studio.loop import train

    stop = threading.Event()

    def on_ctrl_c(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nStopping after this step and saving a checkpoint (Ctrl-C again to abort)...", file=sys.stderr)

    signal.signal(signal.SIGINT, on_ctrl_c)
    with exit_on_user_error():
        cfg = load_config(args.config, overrides_from_pairs(args.set))
        result = train(cfg, EventSink([tqdm_listener()]), stop)
    loss = f", last loss {result.last_loss:.4f}" if result.last_loss is not None else ""
    print(f"{'Stopped' if result.stopped else 'Done'}: step {result.step}/{result.total_steps}{loss}")
    for path in result.files:
        print(f"Adapter: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
