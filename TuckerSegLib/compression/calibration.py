"""Data-aware Tucker-2 factors: choose the channel subspaces the layer's real inputs and outputs use.

Why: plain HOSVD keeps the directions of largest *weight* energy; what matters is the error of the
layer's *output* on real CT activations. With the input-channel covariance ``Sigma_in`` and the
output covariance ``Sigma_out`` measured on a few calibration patches (forward hooks on every
convolution of the original network), the factors minimise ``E || D^-1 (W - W_hat) * x ||``:

- output mode: ``U_out = D V``, with ``V`` the top eigenvectors of ``D^-1 Sigma_out D^-1``. Where an
  InstanceNorm follows the conv (every conv of nnU-Net's encoder and decoder blocks), the norm
  removes each channel's mean and scale per instance, so ``Sigma_out`` is the per-instance centred
  covariance and ``D`` the channels' standard deviations: error is measured after the norm.
- input mode: the whitened SVD: with ``S = Sigma_in^(1/2)``, ``U_in = S^-1 Q`` where ``Q`` are the
  top left singular vectors of the input-mode unfolding of ``V^T D^-1 W x_1 S`` (the kernel the
  core must realise, seen through the input's covariance). Inputs are centred per instance too
  when a norm follows, because a constant input offset only shifts the output by a constant.
- core: the projection of the whitened kernel on both subspaces (least squares in that metric).

Spatial correlation inside the kernel window is not modelled (channel covariances only), and
layers are calibrated on the original network's activations, not sequentially.
The normalised spectra also drive the ``budget`` policy's rank allocation (fraction of the
normalised output variance lost per layer instead of weight energy).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from TuckerSegLib.decomposition.tucker import ModeSpectra, Tucker2
from TuckerSegLib.errors import InputError
from TuckerSegLib.network.surgery import find_sites, get_module
from TuckerSegLib.network.tucker_conv import conv_layout_weight
from TuckerSegLib.progress import NullProgress, Progress

# Ridge added to the input covariance, relative to its mean eigenvalue: keeps S^-1 bounded for
# channels that are (nearly) never active on the calibration data.
RIDGE = 1e-3


@dataclass
class LayerStats:
    """Second moments of one conv's input and output channels, averaged over instances."""

    in_cov: np.ndarray  # (C_in, C_in), conv layout
    out_cov: np.ndarray  # (C_out, C_out)
    centred: bool  # an InstanceNorm follows: moments are per-instance centred
    instances: int = 0


def _followed_by_instance_norm(network: nn.Module, site) -> bool:
    """Whether the conv sits in a conv -> (dropout) -> InstanceNorm block (nnU-Net's ConvDropoutNormReLU)."""
    for path in site.aliases:
        parent_path, _, attr = path.rpartition(".")
        parent = get_module(network, parent_path)
        if attr == "0" and parent_path.endswith("all_modules"):
            parent = get_module(network, parent_path.rpartition(".")[0])
        if getattr(parent, "conv", None) is site.module and \
                isinstance(getattr(parent, "norm", None), nn.modules.instancenorm._InstanceNorm):
            return True
    return False


def _moments(t: torch.Tensor, centred: bool) -> torch.Tensor:
    """Sum over instances of the (C, C) channel second moment per voxel."""
    x = t.detach().flatten(2).float()  # (N, C, V)
    if centred:
        x = x - x.mean(dim=2, keepdim=True)
    return torch.einsum("ncv,ndv->cd", x, x).double().cpu() / x.shape[2]


def _sqrt_and_inverse(cov: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh(cov)
    ridge = RIDGE * max(float(np.mean(np.clip(values, 0, None))), 1e-12)
    root = np.sqrt(np.clip(values, 0, None) + ridge)
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def _top_eig(matrix: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    order = np.argsort(values)[::-1]
    return np.clip(values[order], 0, None), vectors[:, order]


@dataclass
class CalibrationStats:
    """Activation statistics of a network's convs; passed to ``compress_network(calibration=...)``."""

    layers: Dict[str, LayerStats]
    sources: List[str] = field(default_factory=list)
    patches: int = 0
    seconds: float = 0.0

    # -- the interface compress_network uses ------------------------------------------------
    def _prepared(self, name: str, conv: nn.Module):
        st = self.layers.get(name)
        if st is None or st.instances == 0:
            return None
        w = conv_layout_weight(conv).detach().to("cpu", torch.float64).numpy()
        if w.shape[0] != st.out_cov.shape[0] or w.shape[1] != st.in_cov.shape[0]:
            return None
        s, s_inv = _sqrt_and_inverse(st.in_cov)
        if st.centred:
            d = np.sqrt(np.clip(np.diag(st.out_cov), 0, None))
            d = np.maximum(d, 1e-6 * max(float(d.max()), 1e-12))  # dead channels: no division by 0
        else:
            d = np.ones(st.out_cov.shape[0])
        corr = st.out_cov / np.outer(d, d)
        e_out, v_out = _top_eig(corr)
        w_white = np.einsum("oi...,ij->oj...", w / d.reshape(-1, *[1] * (w.ndim - 1)), s)
        return w, s, s_inv, d, e_out, v_out, w_white

    def spectra(self, name: str, conv: nn.Module) -> Optional[ModeSpectra]:
        """Normalised data-aware spectra (each mode sums to 1) for rank allocation, or None."""
        prep = self._prepared(name, conv)
        if prep is None:
            return None
        _, _, _, _, e_out, v_out, w_white = prep
        unf = np.moveaxis(w_white, 1, 0).reshape(w_white.shape[1], -1)
        e_in, v_in = _top_eig(unf @ unf.T)
        e_out = e_out / max(e_out.sum(), 1e-30)
        e_in = e_in / max(e_in.sum(), 1e-30)
        return ModeSpectra(e_out, v_out, e_in, v_in, 1.0)

    def factorise(self, name: str, conv: nn.Module, ranks: Tuple[int, int]) -> Optional[Tucker2]:
        """Data-aware Tucker-2 factors of ``conv`` (conv layout) at ``ranks``, or None without stats."""
        prep = self._prepared(name, conv)
        if prep is None:
            return None
        w, s, s_inv, d, _, v_out, w_white = prep
        r_out, r_in = int(ranks[0]), int(ranks[1])
        v = v_out[:, :r_out]  # (C_out, r_out)
        g = np.einsum("oa,oi...->ai...", v, w_white)  # (r_out, C_in, *k)
        unf = np.moveaxis(g, 1, 0).reshape(g.shape[1], -1)
        _, q = _top_eig(unf @ unf.T)
        q = q[:, :r_in]  # (C_in, r_in)
        core = np.einsum("ai...,ib->ab...", g, q)
        u_out = d[:, None] * v
        u_in = s_inv @ q
        dtype = conv.weight.dtype
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dtype)  # noqa: E731
        return Tucker2(t(core), t(u_out), t(u_in))

    def output_error(self, name: str, conv: nn.Module, factors: Tucker2) -> Optional[float]:
        """Model estimate of the relative output error ``E||D^-1 dW x||^2 / E||D^-1 W x||^2``."""
        st = self.layers.get(name)
        if st is None or st.instances == 0:
            return None
        w = conv_layout_weight(conv).detach().to("cpu", torch.float64).numpy()
        diff = w - factors.reconstruct().detach().to(torch.float64).numpy()
        d = np.sqrt(np.clip(np.diag(st.out_cov), 1e-30, None)) if st.centred else np.ones(w.shape[0])
        shape = [-1] + [1] * (w.ndim - 1)

        def energy(a: np.ndarray) -> float:
            a = np.moveaxis(a / d.reshape(shape), 1, -1).reshape(-1, a.shape[1])
            return float(np.einsum("ni,ij,nj->", a, st.in_cov, a))

        total = energy(w)
        return energy(diff) / total if total > 0 else 0.0

    def describe(self) -> dict:
        """What goes into the compression report (and the manifest)."""
        return {"method": "whitened-svd", "data": list(self.sources), "patches": self.patches,
                "layers": len(self.layers), "ridge": RIDGE,
                "instance_norm_aware": sum(1 for s in self.layers.values() if s.centred),
                "seconds": round(self.seconds, 2)}


def collect_stats(network: nn.Module, patches: torch.Tensor, batch_size: int = 1,
                  device: Union[str, torch.device] = "cpu", sources: Sequence[str] = (),
                  progress: Optional[Progress] = None) -> CalibrationStats:
    """Run ``network`` on ``patches`` (N, C, *patch) and gather every conv's channel moments."""
    progress = progress or NullProgress()
    t0 = time.perf_counter()
    sites = find_sites(network)
    stats: Dict[str, LayerStats] = {}
    handles = []
    for site in sites:
        conv = site.module
        c_in = conv.in_channels
        c_out = conv.out_channels
        centred = _followed_by_instance_norm(network, site)
        st = LayerStats(np.zeros((c_in, c_in)), np.zeros((c_out, c_out)), centred)
        stats[site.name] = st

        def hook(module, inputs, output, st=st):
            st.in_cov += _moments(inputs[0], st.centred).numpy()
            st.out_cov += _moments(output, st.centred).numpy()
            st.instances += int(output.shape[0])

        handles.append(conv.register_forward_hook(hook))
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            n = len(patches)
            for i in range(0, n, batch_size):
                network(patches[i:i + batch_size].to(device))
                progress.update(min(n, i + batch_size) / n, f"calibration patch {min(n, i + batch_size)}/{n}")
    finally:
        for h in handles:
            h.remove()
        network.train(was_training)
    executed = {}
    for name, st in stats.items():
        if st.instances:
            st.in_cov /= st.instances
            st.out_cov /= st.instances
            executed[name] = st
    return CalibrationStats(executed, list(sources), int(len(patches)), time.perf_counter() - t0)


def calibrate(model, images: Sequence[Union[str, Path]], patches_per_ct: int = 4, seed: int = 0,
              device: Union[str, torch.device] = "cpu", progress: Optional[Progress] = None
              ) -> CalibrationStats:
    """Statistics of ``model`` (an ``NnUNetModel``) on random patches of the calibration CTs.

    Every CT is checked and preprocessed like the predictor does; a bad one stops with a one-line
    ``InputError`` naming it.
    """
    from TuckerSegLib.compression.ct_patches import PatchSampler, preprocess

    progress = progress or NullProgress()
    if not images:
        raise InputError("--calibrate needs at least one CT")
    if patches_per_ct < 1:
        raise InputError("calibration needs at least one patch per CT")
    progress.stage("calibrate", f"preprocessing {len(images)} calibration CT(s)")
    cases = preprocess(model, images)
    patches = []
    for i, case in enumerate(cases):
        sampler = PatchSampler([case], model.patch_size, seed=seed + i)
        patches.append(sampler.sample(patches_per_ct)[0])
    progress.stage("calibrate", f"activation statistics on {len(cases) * patches_per_ct} patches")
    network = model.network.to(device)
    try:
        return collect_stats(network, torch.cat(patches), device=device,
                             sources=[str(Path(p).name) for p in images], progress=progress)
    finally:
        model.network.to("cpu")
