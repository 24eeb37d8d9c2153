"""``dattri <command>``: a small dispatcher. ``run`` hands everything after it to Hydra.

Imports are lazy so ``dattri --help`` answers at once.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from typing import List, Optional

USAGE = """usage: dattri <command> [args]

Training-data attribution for PyTorch models: which training samples helped or
hurt each test prediction. Results are (n_train, n_test) score tensors in safetensors.

commands:
  run     compose a config and write a score file (Hydra: overrides, -m sweeps, --cfg job, --info)
  list    show the available attributors, datasets and models with their options
  show    summarize a score file: metadata, statistics, top proponents/opponents
  plot    PNG of a test image, its top proponents/opponents, and a score histogram
  groundtruth  retrain on random subsets / leave-one-out and record test losses (for eval)
  eval    LDS, LOO correlation and mislabel AUC of a score file against a ground truth
  compare agreement of two score files; non-zero exit below thresholds (CI reproducibility)
  merge   assemble shard files (run ... shard.index=i shard.count=N) into one score file

examples:
  dattri run                                         # digits + logistic regression + Grad-Dot
  dattri run attributor=if_explicit model=lr out=/tmp/scores.safetensors
  dattri run -m attributor=grad_dot,grad_cos,if_explicit
  dattri run attributor=grad_dot --cfg job           # print the composed config
  dattri run --help                                  # every config group and option
  dattri show outputs/<run dir>/scores.safetensors --test 0,5
  dattri plot outputs/<run dir>/scores.safetensors --test 3

`dattri <command> --help` explains each command; DATTRI_DEBUG=1 (or --debug) shows tracebacks.
"""


def _run(args: List[str]) -> None:
    from dattri_cli import app  # noqa: PLC0415
    from dattri_cli.precheck import check_run_args  # noqa: PLC0415

    problem = check_run_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    if any(a.split("=")[0] in _COMPLETION for a in args):
        _completion_line()

    # @hydra.main reads sys.argv[1:] itself: hand it only what follows `run`
    sys.argv = [sys.argv[0], *args]
    app.main()


_COMPLETION = {"-sc", "--shell-completion"}


def _completion_line() -> None:
    """Drop the ``run`` word from the line the shell asks Hydra to complete (``dattri run att<TAB>``).

    Hydra's completion script calls ``dattri -sc query=bash`` with the whole line in
    ``COMP_LINE``; Hydra strips the program name only, and would read ``run`` as an override.
    """
    line = os.environ.get("COMP_LINE")
    if line is None:
        return
    match = re.match(r"^(\s*\S+)(\s+run)(\s|$)", line)
    if match:
        os.environ["COMP_LINE"] = line[: match.end(1)] + line[match.end(2) :]
        point = os.environ.get("COMP_POINT", "")
        if point.isdigit() and int(point) >= match.end(2):
            os.environ["COMP_POINT"] = str(int(point) - (match.end(2) - match.end(1)))


def _list(args: List[str]) -> None:
    from dattri_cli import catalog  # noqa: PLC0415

    catalog.main(args)


def _show(args: List[str]) -> None:
    from dattri_cli import show  # noqa: PLC0415

    show.main(args)


def _plot(args: List[str]) -> None:
    from dattri_cli import plot  # noqa: PLC0415

    plot.main(args)


def _groundtruth(args: List[str]) -> None:
    from dattri_cli import groundtruth  # noqa: PLC0415

    groundtruth.main(args)


def _eval(args: List[str]) -> None:
    from dattri_cli import evaluate  # noqa: PLC0415

    sys.exit(evaluate.main(args))


def _compare(args: List[str]) -> None:
    from dattri_cli import compare  # noqa: PLC0415

    sys.exit(compare.main(args))


def _merge(args: List[str]) -> None:
    from dattri_cli import merge  # noqa: PLC0415

    merge.main(args)


#: commands that only read files (no Hydra job, so no Hydra logging)
READERS = ("show", "plot", "eval", "compare", "merge")

COMMANDS = {
    "run": _run,
    "list": _list,
    "show": _show,
    "plot": _plot,
    "groundtruth": _groundtruth,
    "eval": _eval,
    "compare": _compare,
    "merge": _merge,
}


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``dattri`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return
    if args[0] in {"-V", "--version"}:
        from dattri_cli import __version__  # noqa: PLC0415

        print(f"dattri-cli {__version__}")
        return
    if args[0].split("=")[0] in _COMPLETION:  # Hydra's completion script calls `dattri -sc query=bash`
        args = ["run", *args]
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"error: unknown command {args[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    if hasattr(
        signal, "SIGXFSZ"
    ):  # a file-size limit (ulimit -f) then fails a write with EFBIG, which we report
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if args[0] in READERS:  # their log lines (shards found, rows left out) go to stderr, plain
        import logging  # noqa: PLC0415

        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    debug = "--debug" in args[1:] or os.environ.get("DATTRI_DEBUG") == "1"
    rest = [a for a in args[1:] if a != "--debug"]
    if debug and args[0] == "run":
        os.environ["HYDRA_FULL_ERROR"] = "1"
    from dattri_cli.errors import reported  # noqa: PLC0415

    with reported(debug):
        command(rest)
