"""A small worker with the ``tuckerseg segment`` interface, for testing the Slicer module's
process handling (launch, progress parsing, result import, failure, cancel) with a real child
process that speaks the real protocol (``TuckerSegLib.progress.JsonProgress``).

It does not segment. What it does is chosen by ``TUCKERSEG_TEST_WORKER_MODE``:

- ``ok``: writes a multilabel NIfTI on the input's grid to ``-o`` and reports a ``result``. The
  labels come from ``TUCKERSEG_TEST_WORKER_LABELS`` (a real TotalSegmentator output on that grid)
  when set, else from HU thresholds of the input; ``--roi-subset`` keeps only those structures.
- ``error``: reports a one-line ``error`` event and exits 2, as the CLI does for user errors.
- ``crash``: prints a traceback to stderr and exits 1 without an event.
- ``hang``: starts a child process (its pid is written to ``TUCKERSEG_TEST_WORKER_PIDFILE``),
  reports progress, then waits forever: only Cancel ends it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np

from TuckerSegLib.progress import JsonProgress


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("-i", required=True)
    p.add_argument("-o", required=True)
    p.add_argument("--ml", action="store_true")
    p.add_argument("--ratio", type=float, default=None)
    p.add_argument("--min-agreement", type=float, default=None)
    p.add_argument("--policy", default="budget")
    p.add_argument("--task", default="total")
    p.add_argument("--fast", action="store_true")
    p.add_argument("--fastest", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--engine", default="auto")
    p.add_argument("--roi-subset", nargs="+", default=None)
    p.add_argument("--progress", default="json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    progress = JsonProgress()
    mode = os.environ.get("TUCKERSEG_TEST_WORKER_MODE", "ok")
    print("a line that is not a protocol event, as nnU-Net prints them", flush=True)
    progress.stage("load", "Loading the compressed model")
    if mode == "error":
        progress.error("TotalSegmentator weights for task total are not installed")
        print("tuckerseg segment: error: TotalSegmentator weights for task total are not installed",
              file=sys.stderr)
        return 2
    if mode == "crash":
        print("Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: boom",
              file=sys.stderr, flush=True)
        return 1
    if mode == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.environ["TUCKERSEG_TEST_WORKER_PIDFILE"], "w") as handle:
            handle.write(f"{os.getpid()} {child.pid}\n")
        progress.update(0.1, "Segmenting patch 1 of 10", stage="segment")
        while True:
            time.sleep(1)

    from totalsegmentator.map_to_binary import class_map

    names = class_map[args.task]
    image = nib.load(args.i)
    reference = os.environ.get("TUCKERSEG_TEST_WORKER_LABELS")
    if reference:
        labels = np.asanyarray(nib.load(reference).dataobj).astype(np.uint8)
    else:
        hu = np.asanyarray(image.dataobj)
        labels = np.zeros(hu.shape, np.uint8)
        labels[hu > 300] = 25      # bright bone, named sacrum
        labels[(hu > 30) & (hu <= 80)] = 5   # soft tissue, named liver
    if args.roi_subset:
        keep = [v for v, n in names.items() if n in args.roi_subset]
        labels[~np.isin(labels, keep)] = 0
    for k in range(5):
        progress.update((k + 1) / 5, f"Segmenting patch {k + 1} of 5", stage="segment")
    tmp = args.o + ".part.nii.gz"
    nib.save(nib.Nifti1Image(labels, image.affine), tmp)
    os.replace(tmp, args.o)
    present = sorted(int(v) for v in np.unique(labels) if v)
    progress.result({"output": args.o, "labels": {str(v): names[v] for v in present},
                     "seconds": 0.5, "params": 1_000_000, "macs": 2_000_000_000,
                     "params_original": 3_000_000, "macs_original": 6_000_000_000,
                     "ratio": args.ratio if args.ratio is not None else 0.6, "policy": args.policy,
                     "min_agreement": args.min_agreement,
                     "predicted_agreement": None if args.min_agreement is None else 0.961,
                     "agreement_source": "" if args.min_agreement is None else "measured on 2 phantom CT(s)"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
