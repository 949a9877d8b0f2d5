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
    parser.add_argument("--plan", action="store_true",
                        help="print the memory plan and the fitted settings, then exit (loads no weights)")
    parser.add_argument("--vram-gb", type=float, metavar="GB",
                        help="plan and fit for a card with this much memory (the vram_budget_gb key)")
    args = parser.parse_args(argv)
    configure_environment()

    from studio.config import overrides_from_pairs, read_yaml
    from studio.events import EventSink
    from studio.plan.fit import fit_config

    stop = threading.Event()

    def on_ctrl_c(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nStopping after this step and saving a checkpoint (Ctrl-C again to abort)...", file=sys.stderr)

    signal.signal(signal.SIGINT, on_ctrl_c)
    with exit_on_user_error():
        data = {**read_yaml(args.config), **overrides_from_pairs(args.set)}
        if args.vram_gb:
            data["vram_budget_gb"] = args.vram_gb
        fitted = fit_config(data)
        if args.plan:
            print(fitted.report())
            return 0
        from studio.loop import train
        result = train(fitted.cfg, EventSink([tqdm_listener()]), stop, fitted=fitted)
    loss = f", last loss {result.last_loss:.4f}" if result.last_loss is not None else ""
    print(f"{'Stopped' if result.stopped else 'Done'}: step {result.step}/{result.total_steps}{loss}")
    for path in result.files:
        print(f"Adapter: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
