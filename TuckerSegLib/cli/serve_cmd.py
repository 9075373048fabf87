"""``tuckerseg serve``: the warm worker (``TuckerSegLib.serve``)."""
from __future__ import annotations

import argparse

from TuckerSegLib.progress import Progress

HELP = "a warm worker: segment requests as JSON lines on stdin, events on stdout"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Keep libraries, compressed networks and engines loaded between segmentation requests. "
        'Requests are JSON lines on stdin: {"id": "r1", "command": "segment", "args": [... tuckerseg '
        'segment arguments ...]}, {"cancel": "r1"}, {"command": "quit"}. Replies are TUCKERSEG_EVENT '
        'lines on stdout tagged with "request", ending with {"type": "done", "returncode": N}. '
        "Only this process's stdin and stdout are used: no network port is opened.")
    p.add_argument("--no-preload", action="store_true",
                   help="import TotalSegmentator on the first request instead of at start")


def run(args: argparse.Namespace, progress: Progress) -> int:
    from TuckerSegLib.serve.server import serve

    return serve(preload=not args.no_preload)
