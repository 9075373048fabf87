"""``tuckerseg batch``: segment a cohort on Ray (local or a cluster), resumable, one table out."""
from __future__ import annotations

import argparse
import sys

from TuckerSegLib.progress import JsonProgress, Progress
from TuckerSegLib.cli.segment_cmd import add_quality_arguments
from TuckerSegLib.specs import ENGINES, LAYER_FORMS, PRECISION_CHOICES

HELP = "segment many CTs on Ray (local or a cluster), resumable, with a results table"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="NIfTI files, DICOM series folders, folders of them, globs (quoted), or a "
                        "CSV with a path column (and optionally a case_id column)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="output folder: cases/<case_id>/, logs/, manifest.jsonl, results.csv/.parquet; "
                        "rerunning into it continues the batch")
    seg = p.add_argument_group("segmentation (as tuckerseg segment)")
    add_quality_arguments(seg, quality_search=None)
    seg.add_argument("-ta", "--task", default="total", help="TotalSegmentator task (default total)")
    mode = seg.add_mutually_exclusive_group()
    mode.add_argument("-f", "--fast", action="store_true", help="3 mm model (dataset 297)")
    mode.add_argument("-ff", "--fastest", action="store_true", help="6 mm model (dataset 298)")
    seg.add_argument("-rs", "--roi_subset", "--roi-subset", dest="roi_subset", nargs="+", metavar="NAME",
                     help="segment only these structures")
    seg.add_argument("-ml", "--ml", action="store_true",
                     help="one multilabel file per case instead of one file per class")
    seg.add_argument("-s", "--statistics", action="store_true",
                     help="volume and mean HU of every structure, as columns of the results table")
    seg.add_argument("-bs", "--body_seg", "--body-seg", dest="body_seg", action="store_true",
                     help="crop to the body first")
    seg.add_argument("-d", "--device", default="auto",
                     help="auto (GPU workers if the cluster has GPUs, else CPU), cpu, gpu, mps")
    seg.add_argument("--engine", default="auto", choices=list(ENGINES), help="inference engine (default auto)")
    seg.add_argument("--precision", default="auto", choices=list(PRECISION_CHOICES),
                     help="numeric precision (default auto = stock's)")
    seg.add_argument("--layer-forms", default="auto", choices=list(LAYER_FORMS),
                     help="auto: run each factorised layer in its fastest measured form (default)")
    seg.add_argument("--cache-dir", default=None, help="compressed-network cache folder")
    seg.add_argument("--compressed-model", nargs="+", default=[], metavar="DIR",
                     help="compressed-model folder(s) (e.g. from tuckerseg finetune) to use")
    seg.add_argument("--no-download", action="store_true", help="never download missing weights")
    ray_ = p.add_argument_group("Ray")
    ray_.add_argument("--address", default=None,
                      help="join this Ray cluster (auto, HOST:6379, ray://HOST:10001) instead of "
                           "starting a local instance; inputs and OUTDIR must be on shared storage")
    ray_.add_argument("--workers", type=int, default=None,
                      help="worker processes (default: as many as the CPUs/GPUs allow)")
    ray_.add_argument("--cpus-per-worker", type=float, default=1.0,
                      help="CPU cores per worker; its threads are pinned to them (default 1)")
    ray_.add_argument("--gpus-per-worker", type=float, default=None,
                      help="GPUs per worker, fractions share a GPU (default 1 with --device gpu/auto "
                           "on a cluster with GPUs, else 0)")
    ray_.add_argument("--memory-per-worker", type=float, default=None, metavar="GB",
                      help="memory Ray reserves per worker (keeps big CTs from overcommitting a node)")
    ray_.add_argument("--max-retries", type=int, default=2,
                      help="times a case is retried after its worker died (default 2)")
    ray_.add_argument("--num-cpus", type=int, default=None,
                      help="CPUs of the local Ray instance (default: all of this machine's)")
    ray_.add_argument("--object-store-mb", type=int, default=256,
                      help="object store of the local Ray instance in MB (default 256; cases "
                           "travel as paths, not data)")
    csv_ = p.add_argument_group("CSV case lists")
    csv_.add_argument("--path-column", default=None, help="column with the CT paths (default: path, input, ...)")
    csv_.add_argument("--id-column", default=None, help="column with case ids (default: case_id, id, ...)")


def run(args: argparse.Namespace, progress: Progress) -> int:
    from TuckerSegLib.cohort import batch
    from TuckerSegLib.cohort.table import summary_line

    df = batch(args.inputs, args.output, ratio=args.ratio, min_agreement=args.min_agreement,
               validate_on=args.validate_on, policy=args.policy, task=args.task,
               fast=args.fast, fastest=args.fastest, roi_subset=args.roi_subset, ml=args.ml,
               statistics=args.statistics, body_seg=args.body_seg, device=args.device,
               engine=args.engine, precision=args.precision, layer_forms=args.layer_forms,
               cache_dir=args.cache_dir, allow_download=not args.no_download,
               compressed_models=args.compressed_model, address=args.address, workers=args.workers,
               cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
               memory_per_worker_gb=args.memory_per_worker, max_retries=args.max_retries,
               num_cpus=args.num_cpus, object_store_mb=args.object_store_mb,
               path_column=args.path_column, id_column=args.id_column, progress=progress)
    summary = df.attrs["summary"]
    progress.result(summary)
    if not isinstance(progress, JsonProgress):
        print(f"tuckerseg batch: {summary_line(summary)}", file=sys.stderr)
        for f in summary["failures"][:20]:
            print(f"  failed {f['case_id']}: {f['error']}", file=sys.stderr)
        if len(summary["failures"]) > 20:
            print(f"  ... and {len(summary['failures']) - 20} more (see results.csv)", file=sys.stderr)
    return 1 if summary["failed"] else 0
