"""Distillation: train a compressed network to reproduce its uncompressed original on patches.

Why: users rarely have labels, but the original network labels any CT for free. The student
(compressed) learns the teacher's (original) soft outputs:
``loss = T^2 KL(softmax(teacher/T) || softmax(student/T))`` per voxel, optionally plus MSE on
the logits and on intermediate features (the outputs of the encoder and decoder stages, which
keep their names through Tucker surgery), and nnU-Net's Dice + CE against the teacher's argmax
(pseudo labels: Dice weighs small structures as much as large ones, which the voxel-averaged KL
does not). With labels, nnU-Net's own Dice + CE loss is added.

Training is resumable: every ``checkpoint_every`` steps the work folder gets a checkpoint of
safetensors (student weights, Adam moments) and JSON (step, loss curve, sampler state, Adam's
scalars). ``resume=True`` restores the latest and continues the same trajectory: the patch
sampler's random state is part of the checkpoint, and the learning rate depends only on the step.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from TuckerSegLib.errors import InputError
from TuckerSegLib.finetune.agreement import patch_agreement
from TuckerSegLib.compression.ct_patches import PatchSampler
from TuckerSegLib.progress import NullProgress, Progress

CHECKPOINT_PREFIX = "step_"


@dataclass
class DistillConfig:
    """Hyper-parameters of a distillation run (recorded in checkpoints and the report)."""

    steps: int = 200
    lr: float = 1e-3
    min_lr_fraction: float = 0.05  # cosine decay from lr to lr * this
    batch_size: int = 2
    temperature: float = 1.0
    kd_weight: float = 1.0
    logit_weight: float = 0.0  # MSE on logits
    feature_weight: float = 1.0  # MSE on stage outputs
    pseudo_label_weight: float = 1.0  # nnU-Net Dice + CE against the teacher's argmax
    supervised_weight: float = 1.0  # nnU-Net Dice + CE, only when the patches carry labels
    grad_clip: float = 12.0  # as nnU-Net's trainer
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0

    def lr_at(self, step: int) -> float:
        """Cosine schedule; a function of the step only, so that resumed runs match."""
        progress = min(1.0, step / max(1, self.steps))
        low = self.lr * self.min_lr_fraction
        return low + 0.5 * (self.lr - low) * (1.0 + math.cos(math.pi * progress))


@dataclass
class DistillResult:
    network: nn.Module
    steps: int
    loss_curve: List[float]
    agreement_before: Optional[Dict[str, float]] = None
    agreement_after: Optional[Dict[str, float]] = None
    seconds: float = 0.0
    resumed_from: Optional[int] = None
    extra: dict = field(default_factory=dict)


def feature_layer_names(network: nn.Module) -> List[str]:
    """The stage outputs used for feature distillation: ``encoder.stages.i`` and ``decoder.stages.i``."""
    names = []
    for prefix in ("encoder.stages", "decoder.stages"):
        try:
            stages = network.get_submodule(prefix)
        except AttributeError:
            continue
        names += [f"{prefix}.{i}" for i in range(len(stages))]
    return names


class _FeatureTap:
    """Forward hooks that keep the outputs of named submodules for one forward pass."""

    def __init__(self, network: nn.Module, names: Sequence[str]):
        self.outputs: Dict[str, torch.Tensor] = {}
        self.handles = [network.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.outputs[name] = output
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss, per voxel, averaged (``T^2`` keeps gradients T-independent)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1).mean() * t * t


def _supervised_loss(batch_dice: bool = True) -> nn.Module:
    """nnU-Net's default segmentation loss (Dice + CE), as its trainer builds it."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None,
                          dice_class=MemoryEfficientSoftDiceLoss)


# -- checkpoints ---------------------------------------------------------------------------------

def _param_names(network: nn.Module) -> List[str]:
    return [n for n, _ in network.named_parameters()]


def save_checkpoint(work_dir: Path, step: int, student: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    """Write ``work_dir/step_NNNNNN/`` atomically; keep only the ``keep`` newest checkpoints."""
    from safetensors.torch import save_file, save_model

    work_dir.mkdir(parents=True, exist_ok=True)
    dest = work_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=work_dir))
    try:
        save_model(student, str(tmp / "student.safetensors"))
        opt = optimizer.state_dict()
        tensors, scalars = {}, {}
        for idx, st in opt["state"].items():
            for key, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{idx}.{key}"] = value
        save_file(tensors or {"_empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                  for g in opt["param_groups"]]
        meta = {**state, "step": step, "param_names": _param_names(student),
                "optimizer": {"param_groups": groups, "scalars": scalars}}
        (tmp / "state.json").write_text(json.dumps(meta))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(work_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def list_checkpoints(work_dir: Path) -> List[Path]:
    """Complete checkpoints in ``work_dir``, oldest first."""
    if not Path(work_dir).is_dir():
        return []
    found = [p for p in Path(work_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and (p / "state.json").is_file() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def load_checkpoint(path: Path, student: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore student weights and Adam state from ``path``; returns the checkpoint's state dict."""
    from safetensors.torch import load_file, load_model

    meta = json.loads((path / "state.json").read_text())
    if meta.get("param_names") != _param_names(student):
        raise InputError(f"checkpoint {path} belongs to a different network (its parameters do not "
                         f"match); use another --work-dir or drop --resume")
    load_model(student, str(path / "student.safetensors"), strict=True)
    device = next(student.parameters()).device
    tensors = load_file(str(path / "optimizer.safetensors"), device=str(device))
    state: Dict[int, dict] = {}
    for key, value in tensors.items():
        if key == "_empty":
            continue
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["optimizer"]["scalars"].items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = value
    for st in state.values():  # Adam keeps ``step`` on the CPU unless capturable / fused
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].cpu()
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    return meta


# -- training ------------------------------------------------------------------------------------

def distill(teacher: nn.Module, student: nn.Module, sampler: PatchSampler, config: DistillConfig,
            work_dir: Path, device: torch.device = torch.device("cpu"), resume: bool = False,
            val_patches: Optional[torch.Tensor] = None, progress: Optional[Progress] = None,
            run_info: Optional[dict] = None) -> DistillResult:
    """Train ``student`` (in place) to match ``teacher`` on patches from ``sampler``.

    ``val_patches`` (held-out patches) are used to report agreement before and after.
    ``run_info`` is stored in every checkpoint (e.g. the student's ranks) for the caller.
    """
    progress = progress or NullProgress()
    if config.steps < 1:
        raise InputError("--steps must be at least 1")
    if config.batch_size < 1:
        raise InputError("batch size must be at least 1")
    t0 = time.perf_counter()
    work_dir = Path(work_dir)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = student.to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    loss_curve: List[float] = []
    start = 0
    resumed_from = None
    before = None
    if resume:
        checkpoints = list_checkpoints(work_dir)
        if not checkpoints:
            raise InputError(f"--resume: no checkpoint in {work_dir}")
        meta = load_checkpoint(checkpoints[-1], student, optimizer)
        start = resumed_from = int(meta["step"])
        loss_curve = list(meta["loss_curve"])
        sampler.state = meta["sampler_state"]
        before = meta.get("agreement_before")
        progress.log(f"resumed from {checkpoints[-1]} (step {start})")
    if before is None and val_patches is not None:
        before = patch_agreement(teacher, student, val_patches, device)

    names = feature_layer_names(student) if config.feature_weight > 0 else []
    tap_t = _FeatureTap(teacher, names) if names else None
    tap_s = _FeatureTap(student, names) if names else None
    supervised = _supervised_loss() if config.supervised_weight > 0 else None
    pseudo = _supervised_loss() if config.pseudo_label_weight > 0 else None
    student.train()
    last_saved = start
    try:
        for step in range(start, config.steps):
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            x, y = sampler.sample(config.batch_size)
            x = x.to(device)
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            loss = config.kd_weight * kd_loss(s_logits, t_logits, config.temperature)
            if config.logit_weight > 0:
                loss = loss + config.logit_weight * F.mse_loss(s_logits, t_logits)
            if tap_s is not None:
                feat = sum(F.mse_loss(tap_s.outputs[n], tap_t.outputs[n]) for n in names) / len(names)
                loss = loss + config.feature_weight * feat
            if pseudo is not None:
                loss = loss + config.pseudo_label_weight * pseudo(s_logits, t_logits.argmax(1, keepdim=True))
            if supervised is not None and y is not None:
                loss = loss + config.supervised_weight * supervised(s_logits, y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise InputError(f"distillation diverged at step {step + 1} (loss {value}); "
                                 f"lower --lr")
            loss_curve.append(value)
            done = step + 1
            progress.update(done / config.steps, f"step {done}/{config.steps} loss {value:.4f}")
            if done % config.checkpoint_every == 0 or done == config.steps:
                save_checkpoint(work_dir, done, student, optimizer,
                                {"loss_curve": loss_curve, "sampler_state": sampler.state,
                                 "config": asdict(config), "agreement_before": before,
                                 "run_info": run_info or {}},
                                keep=config.keep_checkpoints)
                last_saved = done
    finally:
        for tap in (tap_t, tap_s):
            if tap is not None:
                tap.close()
        student.eval()
    after = patch_agreement(teacher, student, val_patches, device) if val_patches is not None else None
    return DistillResult(student, config.steps, loss_curve, before, after, time.perf_counter() - t0,
                         resumed_from, {"last_checkpoint": last_saved})
