"""Launch LoRA Studio, the web app: `python studio.py [--host 127.0.0.1] [--port 7860] [--workspace ./workspace]`."""

import argparse
import sys
from pathlib import Path

from studio.cli import configure_environment

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--workspace", default=None, help="folder for datasets, configs and runs (default ./workspace)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    parser.add_argument("--auth", metavar="USER:PASS", help="require this login")
    parser.add_argument("--no-demo", action="store_true", help="do not build the tiny demo models")
    args = parser.parse_args(argv)
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not (user and sep and password):
            parser.error("--auth must look like user:password")
        auth = (user, password)
    if (args.host not in LOOPBACK or args.share) and not auth:
        print(f"warning: listening on {'a public link' if args.share else args.host} without a login: anyone who can "
              "reach it can read your workspace and start training. Add --auth user:password.", file=sys.stderr)
    configure_environment()

    from studio.ui.app import build_app, launch
    from studio.workspace import DEFAULT_ROOT

    from studio.hardware import detect

    root = Path(args.workspace or DEFAULT_ROOT).resolve()
    app, studio = build_app(root, with_demo=not args.no_demo)
    # What a user needs and nothing else (gradio's own start-up lines are silenced unless a share link is asked for).
    print(f"LoRA Studio: http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port}\n"
          f"Workspace:   {root}\nDevice:      {detect().summary()}", flush=True)
    launch(app, studio, host=args.host, port=args.port, share=args.share, auth=auth, quiet=not args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
