"""Train a LoRA from a YAML config: `python train.py --config my.yaml` — the same code the studio's Train tab runs.

Several `--config` run one after another (a queue): a failed job does not stop the next, one summary line per job is
printed at the end, and the exit code is non-zero if any failed (2 when every failure was a config or data mistake).
"""

import argparse
import signal
import sys
import threading
import traceback
from pathlib import Path

from studio.cli import configure_environment, exit_on_user_error, field_flags_help, tqdm_listener


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=field_flags_help())
    parser.add_argument("--config", required=True, action="append", metavar="YAML",
                        help="YAML run config (see presets/ and README.md); repeat to run several in order")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config keys (of every config), e.g. --set max_train_steps=100 lora_rank=16")
    parser.add_argument("--plan", action="store_true",
                        help="print the memory plan and the fitted settings, then exit (loads no weights)")
    parser.add_argument("--verbose", action="store_true", help="with --plan: also how each row is computed")
    parser.add_argument("--vram-gb", type=float, metavar="GB",
                        help="plan and fit for a card with this much memory (the vram_budget_gb key)")
    parser.add_argument("--workspace", type=Path, metavar="DIR",
                        help="the studio workspace whose demo a demo preset trains (default: ./workspace)")
    parser.add_argument("--num-processes", type=int, metavar="N",
                        help="train on N GPUs (on a CPU: N processes) through accelerate (the num_processes key)")
    args = parser.parse_args(argv)
    configure_environment()

    stop = threading.Event()

    def on_ctrl_c(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nStopping after this step and saving a checkpoint (Ctrl-C again to abort)...", file=sys.stderr)

    signal.signal(signal.SIGINT, on_ctrl_c)
    if len(args.config) == 1:  # one job: a mistake is the program's error (exit 2), as it always was
        with exit_on_user_error():
            return run_job(args.config[0], args, stop).report()
    return run_queue(args, stop)


class JobResult:
    def __init__(self, config: str, status: str, detail: str, user_error: bool = False):
        self.config, self.status, self.detail, self.user_error = config, status, detail, user_error

    def report(self) -> int:
        from studio.distributed import reports_run
        if self.status != "planned" and reports_run():  # the plan itself was the output; one process of a launch
            print(f"{self.status.capitalize()}: {self.detail}")
        return 0


def run_job(config: str, args, stop: threading.Event) -> JobResult:
    """Fit and train one config (or print its plan); a StudioError propagates."""
    from studio.cli import overrides_from_pairs
    from studio.config import read_yaml
    from studio.demo.for_cli import with_demo_paths
    from studio.plan.fit import fit_config
    from studio.plan.longest import longest_text
    from studio.workspace import DEFAULT_ROOT

    data = {**read_yaml(config), **overrides_from_pairs(args.set)}
    data, demo = with_demo_paths(data, Path(config), (args.workspace or DEFAULT_ROOT).expanduser().resolve())
    if demo:
        print(demo, file=sys.stderr)
    if args.vram_gb:
        data["vram_budget_gb"] = args.vram_gb
    if args.num_processes:
        data["num_processes"] = args.num_processes
    fitted = fit_config(data)
    if args.plan:
        print(fitted.report())
        longest = longest_text(fitted.cfg, fitted.family, fitted.plan.card_gb)  # LLMs on a card
        if longest:
            print(longest)
        if args.verbose:
            print("How the rows are computed:\n" + "\n".join(f"  {row.name}: {row.formula}"
                                                           for row in fitted.plan.rows if row.formula))
        return JobResult(config, "planned", config)
    result = train_indexed(fitted, stop)
    loss = f", last loss {result.last_loss:.4f}" if result.last_loss is not None else ""
    files = "".join(f"\nAdapter: {path}" for path in result.files)
    return JobResult(config, "stopped" if result.stopped else "done",
                     f"step {result.step}/{result.total_steps}{loss}{files}")


def train_indexed(fitted, stop: threading.Event):
    """Train, with the run recorded in its workspace's index when output_dir is workspace/runs/<name>, so the
    studio's Runs table shows it too."""
    from studio import distributed
    from studio.config import to_yaml
    from studio.events import EventSink
    from studio.loop import train
    from studio.run_index import RunIndex

    index = RunIndex.for_output_dir(fitted.cfg.output_dir) if distributed.reports_run() else None
    if not distributed.launched():  # the processes of a launch train where the launching process decided
        fitted = beside_earlier_runs(fitted, index)
    cfg = fitted.cfg
    listeners = [tqdm_listener()]
    if index:
        run = Path(cfg.output_dir).name
        index.record_start(run, to_yaml(cfg), family=fitted.family, task_type=cfg.task_type)
        listeners.append(index.listener(run))
    if distributed.needs_launch(cfg):  # relaunch as num_processes processes; they draw their own progress bar
        return distributed.launch_and_follow(cfg, EventSink(listeners[1:]), stop, console=True)
    return train(cfg, EventSink(listeners), stop, fitted=fitted)


def beside_earlier_runs(fitted, index):
    """A new run never trains over an earlier one: an output_dir that holds a run (or is taken in the workspace's
    index) gives way to `name-2`, `name-3`, ... as the studio does; resume_from keeps it."""
    from dataclasses import replace

    from studio.jobs import with_unique_name

    cfg, renamed = with_unique_name(index, fitted.cfg)
    if renamed:
        print(f"{fitted.cfg.output_dir} already holds a run, so this run writes to {cfg.output_dir}. To continue "
              "that run instead, run again with --set resume_from=latest (and a higher max_train_steps).",
              file=sys.stderr)
    return replace(fitted, cfg=cfg)


def run_queue(args, stop: threading.Event) -> int:
    from studio.errors import StudioError

    results = []
    for config in args.config:
        if stop.is_set():
            results.append(JobResult(config, "skipped", "not started: Ctrl-C stopped the queue"))
            continue
        print(f"=== {config}", file=sys.stderr)
        try:
            results.append(run_job(config, args, stop))
        except StudioError as exc:
            print(f"error: {exc}", file=sys.stderr)
            results.append(JobResult(config, "failed", str(exc).splitlines()[0], user_error=True))
        except Exception as exc:  # noqa: BLE001 - one broken job must not end the queue; its traceback is shown
            traceback.print_exc()
            results.append(JobResult(config, "failed", f"{type(exc).__name__}: {exc}"))
    print("\nSummary:")
    for r in results:
        print(f"  {r.status:<8} {r.config}: {r.detail.splitlines()[0] if r.detail else ''}")
    failed = [r for r in results if r.status in ("failed", "skipped")]
    if not failed:
        return 0
    return 2 if all(r.user_error for r in failed) else 1


if __name__ == "__main__":
    sys.exit(main())
