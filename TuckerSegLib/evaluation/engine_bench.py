"""Per-patch benchmark: stock TotalSegmentator networks against TuckerSeg engines, side by side.

Why: fewer MACs are not less time (PyTorch's slow CPU path for small convs); only timings on the target hardware, in one run so
that machine load hits every configuration alike, say whether a ratio pays. Networks are the real
TotalSegmentator architectures (nnU-Net's PlainConvUNet at TotalSegmentator's widths and patch
sizes) with random weights: timings are representative, outputs are not. Stock = PyTorch eager,
dense, f32, as TotalSegmentator runs on CPU (on CUDA: eager with fp16 autocast, as nnU-Net does).
"""
from __future__ import annotations

import gc
import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from TuckerSegLib.engines.timing import repeat_seconds
from TuckerSegLib.progress import NullProgress, Progress
from TuckerSegLib.specs import CompressionSpec, RunSpec

# TotalSegmentator's networks (from their plans.json): features, output channels, patch (nnU-Net axis order).
ARCHS: Dict[str, dict] = {
    "1.5mm": {"features": (32, 64, 128, 256, 320, 320), "n_out": 25, "patch": (128, 128, 128),
              "dataset_id": 291, "label": "total (1.5 mm, one of 5 parts)"},
    "3mm": {"features": (32, 64, 128, 256, 320), "n_out": 118, "patch": (112, 112, 128),
            "dataset_id": 297, "label": "total --fast (3 mm)"},
    # a small network of the same family, for tests of the benchmark itself
    "tiny": {"features": (8, 16, 32, 32), "n_out": 4, "patch": (32, 32, 32), "dataset_id": None,
             "label": "test network"},
}
DEFAULT_RATIOS = (1.0, 0.5, 0.3, 0.1)


def build_arch(name: str, seed: int = 0) -> nn.Module:
    """The TotalSegmentator network ``name`` with random weights, in eval mode."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    spec = ARCHS[name]
    torch.manual_seed(seed)
    n = len(spec["features"])
    net = PlainConvUNet(1, n, list(spec["features"]), nn.Conv3d, 3, [1] + [2] * (n - 1), 2,
                        spec["n_out"], 2, True, nn.InstanceNorm3d, {"eps": 1e-5, "affine": True},
                        None, None, nn.LeakyReLU, {"inplace": True})
    return net.eval()


class PeakRSS:
    """Samples this process's resident memory while active (Linux /proc; else ru_maxrss).

    ``tree=True`` adds the child processes (nnU-Net's preprocessing and export workers), so a
    pipeline that spawns workers is measured like one that does not; it counts proportional set
    sizes (PSS), so that pages forked workers share with their parent are counted once.
    """

    def __init__(self, interval: float = 0.02, tree: bool = False, pid: Optional[int] = None):
        self.interval = interval
        self.tree = tree
        self.pid = pid  # another process (and, with tree, its children) instead of this one
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def _rss(pid: str, proportional: bool = False) -> int:
        path, key = (f"/proc/{pid}/smaps_rollup", "Pss:") if proportional else (f"/proc/{pid}/status", "VmRSS:")
        try:
            with open(path) as fh:
                for line in fh:
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    @staticmethod
    def _children(pid: str) -> List[str]:
        kids: List[str] = []
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    kids += fh.read().split()
        except OSError:
            pass
        return kids

    def current(self) -> int:
        root = "self" if self.pid is None else str(self.pid)
        own = self._rss(root, self.tree)
        if not own:
            if self.pid is not None:
                return 0  # ended
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.tree:
            todo, seen = self._children(str(os.getpid() if self.pid is None else self.pid)), set()
            while todo:
                pid = todo.pop()
                if pid not in seen:
                    seen.add(pid)
                    own += self._rss(pid, True)
                    todo += self._children(pid)
        return own

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.current())


@dataclass
class Row:
    arch: str
    policy: str
    ratio: float
    engine: str
    precision: str
    seconds: float  # best of the timed runs, per patch
    all_seconds: List[float]
    speedup: float = 0.0  # stock seconds / seconds
    macs_ratio: float = 1.0  # MACs kept; 1 / macs_ratio is the speed-up limit
    params: int = 0
    peak_rss_mb: float = 0.0
    prepare_seconds: float = 0.0
    agreement_vs_torch_f32: Optional[float] = None  # argmax agreement with the same network in torch f32
    max_abs_diff_vs_torch_f32: Optional[float] = None
    gpu_peak_mb: Optional[float] = None
    device: str = ""
    int8_agreement: Optional[float] = None  # int8: agreement stored with the model (validation patches)
    notes: List[str] = field(default_factory=list)


def time_module(module: Callable, x: torch.Tensor, device: torch.device, reps: int,
                warmup: int) -> Tuple[List[float], torch.Tensor]:
    """Seconds of each timed forward and the last output."""
    out = []

    def forward() -> None:
        out[:] = [module(x)]

    with torch.inference_mode():
        times = repeat_seconds(forward, device, reps, warmup)
    return times, (out[0] if out else None)


def default_configs(device: torch.device) -> List[Tuple[str, str]]:
    if device.type == "cuda":
        return [("torch", "fp16"), ("torch", "f32")]
    return [("torch", "f32"), ("openvino", "f32"), ("openvino", "bf16")]


def run_patch_bench(archs: Sequence[str] = ("1.5mm", "3mm"), ratios: Sequence[float] = DEFAULT_RATIOS,
                    policies: Sequence[str] = ("paper", "budget"),
                    configs: Optional[Sequence[Tuple[str, str]]] = None, device: str = "cpu",
                    reps: int = 2, warmup: int = 1, cache_dir: Optional[Path] = None,
                    layer_forms: str = "as-is", progress: Optional[Progress] = None,
                    log: Callable[[str], None] = print, int8_min_agreement: float = 0.99) -> dict:
    """Time every (arch, policy, ratio, engine, precision); returns the JSON-ready result.

    ``openvino:int8`` configs are quantised (NNCF, accuracy control to ``int8_min_agreement``)
    on noise patches: these random-weight networks have no plans to make phantom CT data from."""
    from TuckerSegLib.compression.compress import compress_network
    from TuckerSegLib.engines import prepare_network
    from TuckerSegLib.engines.agreement import compare_logits
    from TuckerSegLib.engines.base import example_input
    from TuckerSegLib.engines.select import describe_device
    from TuckerSegLib.engines.select import resolve_precision, select_engine
    from TuckerSegLib.engines.torch_engine import TorchEngineModule
    from TuckerSegLib.errors import EngineError

    progress = progress or NullProgress()
    dev = torch.device(device)
    configs = list(configs or default_configs(dev))
    stock_precision = "fp16" if dev.type == "cuda" else "f32"
    rows: List[Row] = []
    auto = {}
    for prec in sorted({p for _, p in configs} | {"auto"}):
        try:
            r = resolve_precision(prec, dev)
            auto[prec] = (select_engine("auto", dev, r)[0].name, r)
        except EngineError:
            pass
    for arch in archs:
        spec = ARCHS[arch]
        patch = spec["patch"]
        base = build_arch(arch)
        x = example_input(patch, 1, seed=3).to(dev)
        # stock: dense PyTorch eager, the stock pipeline's precision on this device
        stock_module = TorchEngineModule(base.to(dev), stock_precision, dev)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with PeakRSS() as mem:
            times, _ = time_module(stock_module, x, dev, reps, warmup)
        stock_s = min(times)
        params0 = sum(p.numel() for p in base.parameters())
        rows.append(Row(arch, "stock", 1.0, "torch-eager", stock_precision, stock_s, times, 1.0, 1.0,
                        params0, mem.peak / 2 ** 20, device=describe_device(dev, "torch"),
                        notes=["stock TotalSegmentator network: PyTorch eager, dense"],
                        gpu_peak_mb=torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda" else None))
        log(f"[{arch}] stock torch eager {stock_precision}: {stock_s:.3f} s/patch")
        del stock_module
        networks: List[Tuple[str, float, nn.Module, float]] = [("dense", 1.0, base, 1.0)]
        for policy in policies:
            for ratio in ratios:
                if ratio >= 1.0:
                    continue
                progress.stage("compress", f"{arch}: {policy} {ratio:g}")
                res = compress_network(base.cpu(), CompressionSpec(ratio, policy), patch_size=patch)
                networks.append((policy, ratio, res.network, res.report["macs_ratio"]))
                log(f"[{arch}] compressed {policy} {ratio:g}: MACs kept {res.report['macs_ratio']:.3f}")
        for policy, ratio, net, macs_ratio in networks:
            params = sum(p.numel() for p in net.parameters())
            prepared = []
            for engine, prec in configs:  # prepare every config of this network first
                gc.collect()
                t0 = time.perf_counter()
                try:
                    with PeakRSS() as mem:
                        module, info = prepare_network(net, patch, 1, dev, RunSpec(engine, prec, layer_forms,
                                                               int8_min_agreement=int8_min_agreement),
                                                       cache_dir, check_agreement=False)
                        prep = time.perf_counter() - t0
                        out = None
                        with torch.inference_mode():
                            for _ in range(warmup):
                                out = module(x)
                except EngineError as exc:
                    log(f"[{arch}] {policy} {ratio:g} {engine} {prec}: skipped ({exc})")
                    continue
                prepared.append([engine, info, module, prep, mem.peak, [], out, 0.0])
            # timed rounds interleave the configs, so that load from other processes on a shared
            # machine hits them alike; the best round counts
            for _ in range(reps):
                for item in prepared:
                    gc.collect()
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    with PeakRSS() as mem:
                        times, item[6] = time_module(item[2], x, dev, 1, 0)
                    item[4] = max(item[4], mem.peak)
                    item[5] += times
                    if dev.type == "cuda":  # this configuration's own peak
                        item[7] = max(item[7], torch.cuda.max_memory_allocated(dev) / 2 ** 20)
            reference = next((item[6].float().cpu() for item in prepared
                              if item[0] == "torch" and item[1].precision == "f32"), None)
            for engine, info, module, prep, peak, times, out, gpu_peak in prepared:
                row = Row(arch, policy, ratio, engine, info.precision, min(times), times,
                          stock_s / min(times), macs_ratio, params, peak / 2 ** 20, prep,
                          device=info.device, notes=list(info.notes),
                          gpu_peak_mb=gpu_peak if dev.type == "cuda" else None,
                          int8_agreement=info.agreement if info.precision == "int8" else None)
                if reference is not None:
                    agr = compare_logits(out, reference)
                    row.agreement_vs_torch_f32 = agr.argmax_agreement
                    row.max_abs_diff_vs_torch_f32 = agr.max_abs_diff
                rows.append(row)
                log(f"[{arch}] {policy:>6} {ratio:<4g} {engine:>8} {info.precision:<4}: {row.seconds:7.3f} s/patch  "
                    f"x{row.speedup:5.2f} vs stock (MAC limit x{1 / macs_ratio:5.2f})  "
                    f"RSS {row.peak_rss_mb:6.0f} MB  prep {prep:5.1f} s  runs {', '.join(f'{t:.2f}' for t in times)}")
            del prepared
        # stock again at the end: the best stock run of the whole arch is the reference
        stock_module = TorchEngineModule(base.to(dev), stock_precision, dev)
        more, _ = time_module(stock_module, x, dev, reps, 0)
        del stock_module
        stock_row = next(r for r in rows if r.arch == arch and r.policy == "stock")
        stock_row.all_seconds += more
        best = min(stock_row.all_seconds)
        if best < stock_s:
            log(f"[{arch}] stock best run {best:.3f} s (end of arch); speed-ups rescaled")
            stock_row.seconds = best
            for r in rows:
                if r.arch == arch:
                    r.speedup = best / r.seconds
    return {
        "kind": "per-patch", "device": describe_device(dev, "openvino" if dev.type == "cpu" else "torch"),
        "machine": platform.platform(), "torch": torch.__version__, "openvino": _ov_version(),
        "threads": torch.get_num_threads(), "reps": reps, "warmup": warmup, "layer_forms": layer_forms,
        "auto": {k: {"engine": v[0], "precision": v[1]} for k, v in auto.items()},
        "stock": f"PyTorch eager dense {stock_precision}",
        "rows": [asdict(r) for r in rows],
    }


def _ov_version() -> Optional[str]:
    try:
        import openvino
        return openvino.__version__
    except ImportError:
        return None


def format_table(result: dict) -> str:
    lines = [f"per patch on {result['device']} (torch {result['torch']}, openvino {result['openvino']}, "
             f"best of {result['reps']} after {result['warmup']} warm-up; stock = {result['stock']})",
             f"{'arch':<6} {'policy':<7} {'ratio':>5} {'engine':<11} {'prec':<5} {'s/patch':>8} "
             f"{'speed-up':>8} {'MAC lim':>8} {'params M':>9} {'RSS MB':>7} {'argmax=f32':>10}"]
    lines.append("-" * len(lines[-1]))
    for r in result["rows"]:
        agr = r["agreement_vs_torch_f32"]
        lines.append(f"{r['arch']:<6} {r['policy']:<7} {r['ratio']:>5g} {r['engine']:<11} {r['precision']:<5} "
                     f"{r['seconds']:>8.3f} {r['speedup']:>7.2f}x {1 / r['macs_ratio']:>7.2f}x "
                     f"{r['params'] / 1e6:>9.2f} {r['peak_rss_mb']:>7.0f} "
                     f"{(f'{100 * agr:.3f} %' if agr is not None else '-'):>10}")
    auto = result.get("auto", {}).get("auto")
    if auto:
        lines.append(f"--engine auto --precision auto here = {auto['engine']} {auto['precision']}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """Speed-up against stock per configuration, one panel per architecture, MAC limit dashed."""
    from TuckerSegLib.evaluation.plots import pyplot, save_figure

    plt = pyplot()
    rows = [r for r in result["rows"] if r["policy"] != "stock"]
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(archs)), figsize=(7 * max(1, len(archs)), 4.5), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        mine = [r for r in rows if r["arch"] == arch]
        groups = list(dict.fromkeys((r["policy"], r["ratio"]) for r in mine))
        kinds = list(dict.fromkeys((r["engine"], r["precision"]) for r in mine))
        width = 0.8 / max(1, len(kinds))
        for k, kind in enumerate(kinds):
            xs, ys = [], []
            for g, group in enumerate(groups):
                hit = [r for r in mine if (r["policy"], r["ratio"]) == group and (r["engine"], r["precision"]) == kind]
                if hit:
                    xs.append(g + (k - (len(kinds) - 1) / 2) * width)
                    ys.append(hit[0]["speedup"])
            ax.bar(xs, ys, width, label=f"{kind[0]} {kind[1]}")
        for g, group in enumerate(groups):
            lim = 1 / next(r["macs_ratio"] for r in mine if (r["policy"], r["ratio"]) == group)
            ax.hlines(lim, g - 0.45, g + 0.45, colors="k", linestyles="dashed", linewidth=1)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{p}\n{r:g}" for p, r in groups])
        ax.set_yscale("log")
        ax.set_ylabel("speed-up vs stock (per patch)")
        ax.set_title(f"{arch}: {ARCHS.get(arch, {}).get('label', '')}\n{result['device']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("dashed: MAC limit (1 / MACs kept)", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, tight=False)


def write_json(result: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    return path
