"""Distillation: train a compressed network to reproduce its uncompressed original on patches.

Why: users rarely have labels, but the original network labels any CT for free. The student
(compressed) learns the teacher's (original) soft outputs:
``loss = T^2 KL(softmax(teacher/T) || softmax(student/T))`` per voxel, optionally plus MSE on
the logits and on intermediate features (the outputs of the encoder and decoder stages, which
keep their names through Tucker surgery), and nnU-Net's Dice + CE against the teacher's argmax
(pseudo labels: Dice weighs small structures as much as large ones, which the voxel-averaged KL
does not). With labels, nnU-Net's own Dice + CE loss is added.

Two recipes. ``classic`` runs the teacher on every step on whole patches and adds the feature MSE.
``fast`` (the default) draws a pool of patches once, stores the teacher's top-k answers
(``teacher_cache``), then each step runs only the student, in bf16 autocast on a CUDA GPU or a CPU with
AMX (f32 on other CPUs), channels-last on CPUs, with both losses in one chunked pass
(``losses.fast_recipe_loss``), optionally training only the factorised layers; it has no feature
term (features are not cached). Both stop early at a held-out agreement (``until_agreement``) or a wall-time cap
(``max_minutes``), saving a checkpoint where they stop.

With held-out patches, the student returned is the best one measured (``keep_best``): the
zero-shot student, every ``eval_every`` steps and the last. Why: on weak CPU-trained 3 mm networks
short runs lowered held-out agreement (0.569 -> 0.355 after 30 steps at 50 % of the MACs,
``benchmarks/results/bench_distill_w32_cpu_*``), and a user who waited should never get a
student worse than the one they started from. The best weights are kept in the work folder
(``best/``), so a resumed run keeps them too. Choosing on the validation patches flatters their
figure a little; the benchmark measures on other data as well.

Training is resumable: every ``checkpoint_every`` steps the work folder gets a checkpoint of
safetensors (student weights, Adam moments) and JSON (step, loss curve, sampler state, Adam's
scalars). ``resume=True`` restores the latest and continues the same trajectory: the patch
sampler's and the pool's random states are part of the checkpoint, the pool itself is saved in the
work folder, and the learning rate depends only on the step and the schedule's length, which the
checkpoint keeps.

The cosine schedule runs over ``steps``, or, when ``max_minutes`` ends the run first, over the
steps the cap affords (``planned_steps``, fixed after the first steps are timed). Why: a run
stopped by its time cap otherwise never anneals its learning rate (the benchmark's 20-minute runs
trained at a constant rate), and schedules fitted to the budget beat those cut short (Li et al.,
"Budgeted training", ICLR 2020).
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from TuckerSegLib.errors import InputError
from TuckerSegLib.finetune.agreement import label_agreement
from TuckerSegLib.finetune.losses import dice_ce_loss, fast_recipe_loss, kd_loss, kd_loss_topk
from TuckerSegLib.finetune.teacher_cache import CACHE_DIR, TeacherCache, autocast, teacher_labels, topk_targets
from TuckerSegLib.compression.ct_patches import PatchSampler
from TuckerSegLib.progress import NullProgress, Progress
from TuckerSegLib.storage import writing_dir

CHECKPOINT_PREFIX = "step_"
BEST_DIR = "best"  # the best student measured so far: student.safetensors + best.json


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
    # -- the fast recipe (``recipe="fast"``; see the module docstring) ----------------------
    recipe: str = "fast"  # fast: cached pool of teacher answers; classic: teacher every step
    pool: int = 32  # training patches in the teacher cache (~45 MB each for a 3 mm patch of 118 classes)
    topk: int = 0  # classes stored per voxel; 0: all up to 16 classes, else 8
    exact_cache: bool = False  # store log-probabilities in float32 (tests) instead of float16
    cache_teacher: bool = True  # False: rerun the teacher on the pool's patches every step
    precision: str = "auto"  # student training: auto (bf16 where the CPU/GPU has it), f32, bf16, fp16
    train_params: str = "all"  # all, or factors (only the factorised layers' weights)
    compile: str = "off"  # torch.compile the student: off, on, auto (on CUDA only); not measured yet
    # -- stopping -------------------------------------------------------------------------------
    until_agreement: Optional[float] = None  # stop once held-out mean Dice reaches this
    max_minutes: Optional[float] = None  # stop (and save) before this much wall time is spent
    eval_every: int = 25  # steps between held-out agreement checks (with until_agreement or keep_best)
    keep_best: bool = True  # with held-out patches: return the best student measured (step 0 included)

    def lr_at(self, step: int, horizon: Optional[int] = None) -> float:
        """Cosine schedule over ``horizon`` steps (default ``steps``); a function of the step and
        the horizon only, so that resumed runs match."""
        progress = min(1.0, step / max(1, horizon or self.steps))
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
    stopped: str = "steps"  # steps, agreement (--until-agreement reached) or time (--max-minutes)
    agreement_curve: List[dict] = field(default_factory=list)  # [{step, seconds, mean_dice, ...}]


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


# -- checkpoints ---------------------------------------------------------------------------------

def _param_names(network: nn.Module) -> List[str]:
    return [n for n, _ in network.named_parameters()]


@contextlib.contextmanager
def _default_layout(student: nn.Module):
    """The student in the default memory layout for a while: safetensors' ``save_model`` and
    ``load_model`` (which handle nnU-Net's aliased modules) need contiguous tensors, and a student
    trains channels-last on CPUs."""
    channels_last = any(p.dim() == 5 and not p.is_contiguous() for p in student.parameters())
    if channels_last:
        student.to(memory_format=torch.contiguous_format)
    try:
        yield student
    finally:
        if channels_last:
            student.to(memory_format=torch.channels_last_3d)


def _save_student(student: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    with _default_layout(student):
        save_model(student, str(path))


def _load_student(student: nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    with _default_layout(student):
        load_model(student, str(path), strict=True)


def save_checkpoint(work_dir: Path, step: int, student: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    """Write ``work_dir/step_NNNNNN/`` atomically; keep only the ``keep`` newest checkpoints."""
    from safetensors.torch import save_file

    dest = work_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
    with writing_dir(dest) as tmp:
        _save_student(student, tmp / "student.safetensors")
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
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text())
    if meta.get("param_names") != _param_names(student):
        raise InputError(f"checkpoint {path} belongs to a different network (its parameters do not "
                         f"match); use another --work-dir or drop --resume")
    _load_student(student, path / "student.safetensors")
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


def save_best(work_dir: Path, student: nn.Module, record: dict) -> None:
    """Write ``work_dir/best/`` (the student's weights and ``record``) atomically."""
    with writing_dir(Path(work_dir) / BEST_DIR) as tmp:
        _save_student(student, tmp / "student.safetensors")
        (tmp / "best.json").write_text(json.dumps({**record, "param_names": _param_names(student)}))


def read_best(work_dir: Path, student: nn.Module) -> Optional[dict]:
    """The record of ``work_dir/best/`` when it belongs to ``student``'s network, else None."""
    try:
        record = json.loads((Path(work_dir) / BEST_DIR / "best.json").read_text())
    except (OSError, ValueError):
        return None
    if record.pop("param_names", None) != _param_names(student):
        return None
    return record


def restore_best(work_dir: Path, student: nn.Module) -> None:
    _load_student(student, Path(work_dir) / BEST_DIR / "student.safetensors")


# -- training ------------------------------------------------------------------------------------

def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA GPUs that have it (else fp16) and on CPUs with AMX, f32 elsewhere."""
    if precision not in ("auto", "f32", "bf16", "fp16"):
        raise InputError(f"unknown precision {precision!r}; use auto, f32, bf16 or fp16")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise InputError("fp16 training needs a GPU; use bf16 or f32 on a CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # CPU: bf16 where it has AMX (``amx_bf16``): a whole-patch step of a 3 mm student at 50 % of
    # the MACs, pseudo-label loss left out, 1.66x faster than f32 on an Intel Xeon with AMX (9.2
    # against 15.3 s), with finite gradients on a trained half-width network
    # (``benchmarks/bench_distill_step.py``). Elsewhere f32: on an AVX-512 BF16 CPU without AMX
    # bf16 was 1.4x faster, but on a trained 3 mm network its backward pass gave infinite gradient
    # norms from the first step (f32: 3 to 6). Where bf16 overflows all the same, ``distill`` goes
    # on in f32.
    from TuckerSegLib.devices import cpu_flags

    return "bf16" if "amx_bf16" in (cpu_flags() or ()) else "f32"


def trainable_parameters(student: nn.Module, which: str) -> List[nn.Parameter]:
    """``all`` parameters, or only those of factorised layers (``factors``: first, core, last)."""
    from TuckerSegLib.network.tucker_conv import TuckerConv

    if which == "all":
        return list(student.parameters())
    if which != "factors":
        raise InputError(f"unknown train_params {which!r}; use all or factors")
    params = [p for m in student.modules() if isinstance(m, TuckerConv) for p in m.parameters()]
    if not params:
        raise InputError("the student has no factorised layers to train; use train_params='all'")
    return params


def _is_3d(network: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv3d) for m in network.modules())


def _teacher_fingerprint(teacher: nn.Module) -> List[float]:
    with torch.no_grad():
        return [len(list(teacher.parameters())),
                round(float(sum(p.double().abs().sum() for p in teacher.parameters())), 6)]


# steps timed before the schedule's length is fitted to a time cap (the first includes set-up)
TIMED_STEPS = 3


def planned_steps(done: int, seconds_left: float, step_seconds: float, eval_seconds: float,
                  eval_every: int, steps: int) -> int:
    """How many steps a run can finish in ``seconds_left``: the schedule's length under a time cap.

    ``step_seconds`` is one step's wall time, ``eval_seconds`` one held-out check's (0 without),
    paid every ``eval_every`` steps; never more than ``steps``, never fewer than ``done + 1``."""
    per_step = step_seconds + (eval_seconds / max(1, eval_every) if eval_seconds > 0 else 0.0)
    return max(done + 1, min(steps, done + int(max(0.0, seconds_left) / max(per_step, 1e-9))))


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def distill(teacher: nn.Module, student: nn.Module, sampler: PatchSampler, config: DistillConfig,
            work_dir: Path, device: torch.device = torch.device("cpu"), resume: bool = False,
            val_patches: Optional[torch.Tensor] = None, progress: Optional[Progress] = None,
            run_info: Optional[dict] = None, started_at: Optional[float] = None) -> DistillResult:
    """Train ``student`` (in place) to match ``teacher`` on patches from ``sampler``.

    ``val_patches`` (held-out patches, at the model's patch size) give the agreement before and
    after, and the early stop of ``config.until_agreement``. ``run_info`` is stored in every
    checkpoint (e.g. the student's ranks) for the caller. ``started_at`` (``time.perf_counter()``)
    is where ``config.max_minutes`` counts from (default: now).

    ``config.recipe``: ``classic`` runs the teacher on every step on ``sampler``'s patches, with
    soft targets, pseudo labels and stage-feature MSE; ``fast`` draws a pool of ``config.pool``
    patches from ``sampler`` once (its patch size is the training crop), stores the teacher's
    top-k answers (``teacher_cache``) and trains on soft targets and pseudo labels in
    ``config.precision`` (features are not cached: ``feature_weight`` and ``logit_weight`` are not
    used).
    """
    progress = progress or NullProgress()
    if config.steps < 1:
        raise InputError("--steps must be at least 1")
    if config.batch_size < 1:
        raise InputError("batch size must be at least 1")
    if config.recipe not in ("classic", "fast"):
        raise InputError(f"unknown recipe {config.recipe!r}; use fast or classic")
    t0 = time.perf_counter()
    started_at = t0 if started_at is None else started_at
    deadline = started_at + 60.0 * config.max_minutes if config.max_minutes else None
    work_dir = Path(work_dir)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = student.to(device)
    fast = config.recipe == "fast"
    # oneDNN's 3D convolutions are fastest channels-last on CPUs (timed together with the fused
    # loss in benchmarks/bench_distill_step.py); CUDA keeps the layout it was measured with
    channels_last = fast and device.type == "cpu" and _is_3d(student)
    if channels_last:
        student.to(memory_format=torch.channels_last_3d)
    precision = resolve_precision(config.precision, device) if fast else "f32"
    params = trainable_parameters(student, config.train_params)
    trainable = {id(p) for p in params}
    for p in student.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    loss_curve: List[float] = []
    agreement_curve: List[dict] = []
    start = 0
    resumed_from = None
    before = None
    meta: dict = {}
    if resume:
        checkpoints = list_checkpoints(work_dir)
        if not checkpoints:
            raise InputError(f"--resume: no checkpoint in {work_dir}")
        meta = load_checkpoint(checkpoints[-1], student, optimizer)
        start = resumed_from = int(meta["step"])
        loss_curve = list(meta["loss_curve"])
        agreement_curve = list(meta.get("agreement_curve", []))
        sampler.state = meta["sampler_state"]
        before = meta.get("agreement_before")
        progress.log(f"resumed from {checkpoints[-1]} (step {start})")

    val_labels = teacher_labels(teacher, val_patches, device) if val_patches is not None else None

    def evaluate() -> Dict[str, float]:
        return label_agreement(student, val_patches, val_labels, device)

    eval_seconds = 0.0
    if before is None and val_patches is not None:
        te = time.perf_counter()
        before = evaluate()
        eval_seconds = time.perf_counter() - te
    keep_best = config.keep_best and val_patches is not None
    best: Optional[dict] = read_best(work_dir, student) if (keep_best and resume) else None
    if keep_best and best is None and not resume and before is not None:
        best = {"step": start, **before}
        save_best(work_dir, student, best)

    # -- the source of (input, teacher answer) per step ---------------------------------------
    cache: Optional[TeacherCache] = None
    if fast:
        signature = {"pool": config.pool, "topk": config.topk, "exact": config.exact_cache,
                     "temperature": config.temperature, "seed": config.seed,
                     "crop": list(sampler.patch_size), "cases": [c.name for c in sampler.cases],
                     "augment": sampler.augment.as_dict() if sampler.augment is not None else None,
                     "teacher": _teacher_fingerprint(teacher)}
        cache = TeacherCache.load(work_dir / CACHE_DIR, signature) if resume else None
        if cache is None:
            if resume:
                progress.log("teacher cache missing or different: rebuilding it")
            saved_state = sampler.state
            progress.update(0.0, f"teacher answers for {config.pool} patches of {list(sampler.patch_size)}")
            cache = TeacherCache.build(
                teacher, lambda n: sampler.sample(n)[0], config.pool, config.topk, config.temperature, device,
                precision="f32", batch_size=config.batch_size, exact=config.exact_cache,
                seed=config.seed + 40_000,
                on_batch=lambda d, n: progress.update(0.0, f"teacher answers: {d}/{n} patches"))
            sampler.state = saved_state
            cache.save(work_dir / CACHE_DIR, signature)
            progress.log(f"teacher cache: {len(cache)} patches of {list(sampler.patch_size)}, top-{cache.k} "
                         f"of {cache.num_classes} classes, {cache.nbytes / 2 ** 20:.0f} MiB, "
                         f"{cache.seconds:.1f} s")
        if resume and "pool_state" in meta:
            cache.state = meta["pool_state"]

    names = feature_layer_names(student) if (config.feature_weight > 0 and not fast) else []
    tap_t = _FeatureTap(teacher, names) if names else None
    tap_s = _FeatureTap(student, names) if names else None
    use_compile = config.compile == "on" or (config.compile == "auto" and device.type == "cuda" and fast)
    forward = torch.compile(student) if use_compile else student

    def classic_loss() -> torch.Tensor:
        x, y = sampler.sample(config.batch_size)
        x = x.to(device)
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = forward(x)
        loss = config.kd_weight * kd_loss(s_logits, t_logits, config.temperature)
        if config.logit_weight > 0:
            loss = loss + config.logit_weight * F.mse_loss(s_logits, t_logits)
        if tap_s is not None:
            feat = sum(F.mse_loss(tap_s.outputs[n], tap_t.outputs[n]) for n in names) / len(names)
            loss = loss + config.feature_weight * feat
        if config.pseudo_label_weight > 0:
            loss = loss + config.pseudo_label_weight * dice_ce_loss(s_logits, t_logits.argmax(1, keepdim=True))
        if config.supervised_weight > 0 and y is not None:
            loss = loss + config.supervised_weight * dice_ce_loss(s_logits, y.to(device))
        return loss

    def fast_loss() -> torch.Tensor:
        x, t_logp, t_idx = cache.batch(cache.draw(config.batch_size), device)
        if not config.cache_teacher:  # ablation / test: the same patches, teacher recomputed
            with torch.no_grad():
                t_logp, t_idx = topk_targets(teacher(x), cache.k, config.temperature, cache.logp.dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with autocast(device, precision):
            s_logits = forward(x)
        if config.temperature == 1.0:  # both losses in one pass over the voxels (losses.fast_recipe_loss)
            return fast_recipe_loss(s_logits, t_logp, t_idx, config.kd_weight, config.pseudo_label_weight)
        s_logits = s_logits.float()
        loss = config.kd_weight * kd_loss_topk(s_logits, t_logp, t_idx, config.temperature)
        if config.pseudo_label_weight > 0:
            loss = loss + config.pseudo_label_weight * dice_ce_loss(s_logits, t_idx[:, :1])
        return loss

    student.train()
    last_saved = start
    stopped = "steps"
    train_t0 = time.perf_counter()
    step_times: List[float] = []
    cpu_times: List[float] = []  # process CPU seconds per step (steady under other load, unlike wall time)
    last_eval = agreement_curve[-1] if agreement_curve else None
    # the cosine's length: config.steps, or what the time cap affords (fixed once steps are timed)
    horizon: Optional[int] = meta.get("schedule_steps") if deadline is not None else config.steps
    checks = val_patches is not None and (config.until_agreement is not None or keep_best)

    def checkpoint(done: int) -> None:
        state = {"loss_curve": loss_curve, "sampler_state": sampler.state, "config": asdict(config),
                 "schedule_steps": horizon,
                 "agreement_before": before, "agreement_curve": agreement_curve,
                 "run_info": run_info or {}}
        if cache is not None:
            state["pool_state"] = cache.state
        save_checkpoint(work_dir, done, student, optimizer, state, keep=config.keep_checkpoints)

    try:
        for step in range(start, config.steps):
            if deadline is not None and step_times:
                expected = sorted(step_times[-20:])[len(step_times[-20:]) // 2]
                if time.perf_counter() + expected > deadline:
                    stopped = "time"
                    break
            if horizon is None and len(step_times) >= TIMED_STEPS:
                horizon = planned_steps(step, deadline - time.perf_counter(),
                                        sorted(step_times)[len(step_times) // 2],
                                        eval_seconds if checks else 0.0, config.eval_every, config.steps)
                progress.log(f"learning rate: cosine over {horizon} steps (what --max-minutes affords)")
            ts, cs = time.perf_counter(), time.process_time()
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step, horizon)
            loss = fast_loss() if fast else classic_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
            if not torch.isfinite(norm):
                if precision == "f32":
                    raise InputError(f"distillation diverged at step {step + 1} (gradient norm {float(norm)}); "
                                     f"lower --lr")
                # reduced precision overflowed: skip this update, go on in float32
                progress.log(f"step {step + 1}: non-finite gradients in {precision}; skipping the update "
                             f"and continuing in f32")
                precision = "f32"
                optimizer.zero_grad(set_to_none=True)
            else:
                optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise InputError(f"distillation diverged at step {step + 1} (loss {value}); "
                                 f"lower --lr")
            loss_curve.append(value)
            step_times.append(time.perf_counter() - ts)
            cpu_times.append(time.process_time() - cs)
            done = step + 1
            reached = False
            if checks and (done % max(1, config.eval_every) == 0 or done == config.steps):
                a = evaluate()
                last_eval = {"step": done, "seconds": round(time.perf_counter() - t0, 1), **a}
                agreement_curve.append(last_eval)
                reached = config.until_agreement is not None and a["mean_dice"] >= config.until_agreement
                if keep_best and (best is None or a["mean_dice"] > best["mean_dice"]):
                    best = {"step": done, **a}
                    save_best(work_dir, student, best)
            rate = len(step_times) / max(1e-9, sum(step_times))
            planned = max(done, horizon or config.steps)  # the bar follows the planned steps
            left = (planned - done) / rate
            if deadline is not None:
                left = min(left, max(0.0, deadline - time.perf_counter()))
            text = (f"step {done}/{planned} loss {value:.4f} {rate:.2f} steps/s"
                    + (f" agreement {last_eval['mean_dice']:.3f}" if last_eval else "")
                    + f" ETA {_fmt_minutes(left)}")
            progress.update(done / planned, text)
            if done % config.checkpoint_every == 0 or done == config.steps or reached:
                checkpoint(done)
                last_saved = done
            if reached:
                stopped = "agreement"
                break
        if stopped == "time" and loss_curve and last_saved != len(loss_curve):
            checkpoint(len(loss_curve))
            last_saved = len(loss_curve)
    finally:
        for tap in (tap_t, tap_s):
            if tap is not None:
                tap.close()
        student.eval()
        if channels_last:
            student.to(memory_format=torch.contiguous_format)
        for p in student.parameters():
            p.requires_grad_(True)
    train_seconds = time.perf_counter() - train_t0
    if val_patches is None:
        after = None
    elif last_eval is not None and last_eval["step"] == len(loss_curve):
        after = {k: last_eval[k] for k in ("voxel_agreement", "mean_dice")}
    else:
        after = evaluate()
    if stopped != "steps":
        progress.log(f"stopped after {len(loss_curve)} steps: "
                     + ("held-out agreement reached the target" if stopped == "agreement" else "time cap"))
    last_agreement = after
    kept_step = len(loss_curve)
    if keep_best and after is not None and best is not None and best["mean_dice"] > after["mean_dice"]:
        restore_best(work_dir, student)
        kept_step = int(best["step"])
        after = {k: best[k] for k in ("voxel_agreement", "mean_dice")}
        progress.log(f"kept the student of step {kept_step} (held-out mean Dice {after['mean_dice']:.3f}); "
                     f"the last step's agreed {last_agreement['mean_dice']:.3f}")
    extra = {"last_checkpoint": last_saved, "precision": precision, "compiled": use_compile,
             "train_params": config.train_params, "train_seconds": round(train_seconds, 2),
             "steps_run": len(step_times), "kept_step": kept_step, "last_agreement": last_agreement,
             "schedule_steps": horizon, "last_lr": optimizer.param_groups[0]["lr"],
             "steps_per_second": round(len(step_times) / sum(step_times), 4) if step_times else None,
             "cpu_seconds_per_step": round(sum(cpu_times) / len(cpu_times), 3) if cpu_times else None}
    if cache is not None:
        extra["teacher_cache"] = {"patches": len(cache), "crop": list(sampler.patch_size), "topk": cache.k,
                                  "classes": cache.num_classes, "mib": round(cache.nbytes / 2 ** 20, 1),
                                  "seconds": round(cache.seconds, 2), "recomputed": not config.cache_teacher}
    return DistillResult(student, len(loss_curve), loss_curve, before, after, time.perf_counter() - t0,
                         resumed_from, extra, stopped, agreement_curve)
