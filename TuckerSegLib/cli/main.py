"""Entry point of the ``tuckerseg`` command.

Each subcommand lives in its own module ``TuckerSegLib.cli.<name>_cmd`` exposing
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args, progress) -> int``. Modules are
imported only for the command that runs, so ``tuckerseg --help`` stays fast.

User errors (``TuckerSegError``) print one line and exit non-zero; ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import List, Optional

from TuckerSegLib.errors import TuckerSegError
from TuckerSegLib.progress import Progress, make_progress

# name -> (module, one-line help). The order is the order of `tuckerseg --help`.
COMMANDS = {
    "demo": ("demo_cmd", "offline demo: phantom CT, compress the built-in model at a few ratios, segment, report"),
    "compress": ("compress_cmd", "compress an nnU-Net model folder at a ratio into a compressed-model folder"),
    "info": ("info_cmd", "report params, MACs and ranks of an nnU-Net or compressed-model folder"),
    "segment": ("segment_cmd", "segment a CT with compressed TotalSegmentator models"),
    "batch": ("batch_cmd", "segment many CTs on Ray (local or a cluster), resumable, with a results table"),
    "eval": ("eval_cmd", "compare compressed models against references and the uncompressed model"),
    "bench": ("bench_cmd", "time stock vs compressed networks per patch and end to end"),
    "finetune": ("finetune_cmd", "recover quality by distilling a compressed model from its original"),
    "serve": ("serve_cmd", "a warm worker: segment requests as JSON lines on stdin, events on stdout"),
}


def _available_commands() -> dict:
    """Commands whose module is present in this installation."""
    found = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(f"TuckerSegLib.cli.{module}") is not None:
            found[name] = (module, help_text)
    return found


def build_parser() -> argparse.ArgumentParser:
    from TuckerSegLib import __version__

    parser = argparse.ArgumentParser(
        prog="tuckerseg",
        description="TotalSegmentator with Tucker-2 compressed nnU-Net networks: pick a compression "
                    "ratio, get the segmentation faster.",
    )
    parser.add_argument("--version", action="version", version=f"tuckerseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available_commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                       help="progress display: tqdm bar on stderr (default), JSON event lines on "
                            "stdout (for the Slicer module), or none")
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        p.set_defaults(_module=module, one_shot=False)  # main(one_shot=True): the process ends after it
        # The command's own arguments are added lazily, only for the command being parsed.
        p.set_defaults(_lazy=True)
    return parser


def parse_command(argv: List[str]) -> argparse.Namespace:
    """``argv`` parsed as ``tuckerseg`` parses it (argparse exits with 2 on a bad flag)."""
    parser = build_parser()
    commands = _available_commands()
    # Add the chosen command's arguments before parsing (keeps --help of other commands cheap).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen in commands:
        mod = importlib.import_module(f"TuckerSegLib.cli.{commands[chosen][0]}")
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        mod.add_arguments(subparsers.choices[chosen])
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        raise SystemExit(1)
    return args


def main(argv: Optional[List[str]] = None, one_shot: bool = False) -> int:
    """Run one ``tuckerseg`` command; ``one_shot``: the process ends after it (``console_main``),
    so nothing is kept for a later command (``segment`` frees each network once it has run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_command(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    args.one_shot = one_shot
    mod = importlib.import_module(f"TuckerSegLib.cli.{args._module}")
    progress = make_progress(args.progress)
    debug = args.debug or os.environ.get("TUCKERSEG_DEBUG") == "1"
    return run_command(mod, args, progress, debug)


def run_command(mod, args: argparse.Namespace, progress: Progress, debug: bool = False) -> int:
    """Run one parsed command; a user error becomes one line (an ``error`` event and stderr) and
    its exit code. Shared by ``main`` and the warm worker (``tuckerseg serve``)."""
    try:
        code = mod.run(args, progress)
        return int(code or 0)
    except TuckerSegError as exc:
        if debug:
            raise
        progress.error(str(exc))
        print(f"tuckerseg {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        progress.error("cancelled")
        print(f"tuckerseg {args.command}: cancelled", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if debug:
            raise
        message = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        progress.error(message)
        print(f"tuckerseg {args.command}: internal error: {message} (rerun with --debug for the "
              f"traceback)", file=sys.stderr)
        return 1


def console_main() -> None:
    """The ``tuckerseg`` command as a process (console script, ``python -m TuckerSegLib``):
    ``main()``, then a quick exit.

    Why: tearing down the interpreter, which frees the tens of thousands of objects that torch,
    nnU-Net and TotalSegmentator create on import, takes 1-1.5 s on a 2-core CPU after the result
    is written (``benchmarks/bench_whole_process.py``), and a process about to end gains nothing
    from it. Other threads are joined, exit handlers run (temporary folders, logging, Ray) and the
    streams are flushed; then ``os._exit`` skips the teardown. ``main()`` itself, which tests and
    the warm worker call in-process, returns as before.
    """
    code = main(one_shot=True)
    try:
        import atexit
        import threading

        threading._shutdown()  # what the interpreter does first: stops executors, joins threads
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # anything unusual: the ordinary exit
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    console_main()
