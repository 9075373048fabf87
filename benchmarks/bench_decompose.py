"""How long does compressing one TotalSegmentator 1.5 mm network take? (target: < 10 s on 2 cores)

Builds the exact 1.5 mm architecture (PlainConvUNet, 6 stages, 32..320 features, 25 outputs,
128^3 patch) with random weights and times ``compress_network`` for each policy, side by side.

    python benchmarks/bench_decompose.py [--ratio 0.3] [--hooi]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from TuckerSegLib.compression.compress import compress_network
from TuckerSegLib.specs import CompressionSpec


def totalseg_15mm() -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(1, 6, [32, 64, 128, 256, 320, 320], nn.Conv3d, 3, [1, 2, 2, 2, 2, 2], 2, 25, 2,
                         True, nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                         nn.LeakyReLU, {"inplace": True}).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--hooi", action="store_true", help="also time HOOI (tensorly), ~10x slower")
    args = ap.parse_args()
    torch.manual_seed(0)
    net = totalseg_15mm()
    print(f"torch threads: {torch.get_num_threads()}; network params: "
          f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M")
    runs = [(p, "hosvd") for p in ("budget", "uniform", "energy", "paper")]
    if args.hooi:
        runs.append(("paper", "hooi"))
    print(f"{'policy':<8} {'method':<6} {'seconds':>8} {'params kept':>12} {'MACs kept':>10}")
    for policy, method in runs:
        ratio = 0.9 if policy == "energy" else args.ratio
        t0 = time.perf_counter()
        res = compress_network(net, CompressionSpec(ratio, policy, method=method), patch_size=(128, 128, 128))
        dt = time.perf_counter() - t0
        print(f"{policy:<8} {method:<6} {dt:>8.2f} {res.report['params_ratio']:>12.3f} "
              f"{res.report['macs_ratio']:>10.3f}")


if __name__ == "__main__":
    main()
