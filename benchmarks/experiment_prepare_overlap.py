"""Experiment (not kept in the pipeline): prepare a model in a thread while TotalSegmentator's and
nnU-Net's modules import, instead of after them.

Why it was tried: a warm default ``--fast`` run spends about 4.5 s importing torch, nnU-Net and
TotalSegmentator and 1.6 s loading the model and its engine, one after the other, on a 2-core CPU
where one core idles during imports. Each mode runs in a fresh process and prints when the imports
were done, when the model was ready and how long the first real inference took:

- ``seq``: imports, then prepare (what the pipeline does);
- ``par``: prepare in a thread while the main thread imports;
- ``seqwarm`` / ``parwarm``: the same plus one warm-up inference of the prepared engine on zeros.

    python benchmarks/experiment_prepare_overlap.py MODEL_FOLDER CACHE_DIR --rounds 2

Result on the trained full-width 3 mm network (2-core AMD EPYC, OpenVINO bf16, 2026-11-28, two
rounds): seq 9.36 / 7.50 s, par 8.10 / 7.68 s, seqwarm 9.94 / 9.31 s, parwarm 10.02 / 10.48 s.
Both threads hold the GIL most of the time (imports, unpickling, building the network) and the
warm-up costs a whole inference on the same two cores: no gain beyond the noise, so the pipeline
keeps preparing after the imports.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = r'''
import sys, threading, time
t0 = time.perf_counter()
mode, folder, cache = sys.argv[1], sys.argv[2], sys.argv[3]
from pathlib import Path
import torch


def prepare():
    from TuckerSegLib.pipeline.predictor_hook import prepare_for_run
    from TuckerSegLib.specs import CompressionSpec, RunSpec

    loaded, module, _ = prepare_for_run(Path(folder), [0], "checkpoint_final.pth", CompressionSpec(ratio=1.0),
                                        RunSpec(engine="openvino", precision="bf16"), torch.device("cpu"),
                                        Path(cache))
    if mode.endswith("warm"):
        with torch.inference_mode():
            module(torch.zeros(1, loaded.in_channels, *loaded.patch_size))
    return module, loaded


def imports():
    import nnunetv2.inference.predict_from_raw_data, totalsegmentator.nnunet, totalsegmentator.python_api  # noqa


res = {}
if mode.startswith("seq"):
    imports()
    t1 = time.perf_counter()
    res["m"] = prepare()
else:
    th = threading.Thread(target=lambda: res.setdefault("m", prepare()))
    th.start()
    imports()
    t1 = time.perf_counter()
    th.join()
t2 = time.perf_counter()
module, loaded = res["m"]
with torch.inference_mode():
    module(torch.randn(1, loaded.in_channels, *loaded.patch_size))
t3 = time.perf_counter()
print(f"{mode}: imports done {t1 - t0:.2f} s, ready {t2 - t0:.2f} s, first real inference {t3 - t2:.2f} s, "
      f"total {t3 - t0:.2f} s")
'''


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_folder")
    p.add_argument("cache_dir", help="a TuckerSeg cache folder (the engine files are made there once)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    for _ in range(args.rounds):
        for mode in ("seq", "par", "seqwarm", "parwarm"):
            out = subprocess.run([sys.executable, "-c", CHILD, mode, args.model_folder, args.cache_dir],
                                 capture_output=True, text=True)
            print(out.stdout.strip() or out.stderr.strip()[-500:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
