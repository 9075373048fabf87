"""The distillation losses, with closed-form gradients where autograd's chain is what a step costs.

Why: on 2 CPU cores a whole-patch step of a 3 mm student spends as much time in the losses over
118 classes as in the network. Each loss here makes one pass over the classes forward and one
backward, and equals its plain form (tests compare values and gradients with autograd's):

- ``kd_loss``: Hinton's soft-target KL against the teacher's full logits (the classic recipe).
- ``kd_loss_topk``: the same against the teacher's stored top-k answers (``teacher_cache``).
- ``dice_ce_loss``: nnU-Net's training loss (Dice + cross-entropy, batch Dice without the
  background, as its trainer builds it) against a label map: the teacher's argmax (pseudo
  labels) or real labels. ``nnunet_dice_ce`` builds nnU-Net's own module, the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from TuckerSegLib.finetune.teacher_cache import LOGP_FLOOR

DICE_SMOOTH = 1e-5  # nnU-Net's trainer: soft Dice smoothing
# Softmax terms below exp(EXP_FLOOR) = 4e-18 of the largest are held there, and teacher
# probabilities below it count as 0. Why: logits that spread by more than 87 make float32
# exponentials denormal, and x86 computes with denormals several times slower; that made the
# closed-form losses 7x slower on a random-weight network (logits spread by 100) than on a trained
# one (13), and the network's backward 3x (benchmarks/bench_distill_step.py). Fully trained
# networks can spread that far too. ``torch.set_flush_denormal`` covers only the calling thread,
# not torch's worker threads. The change is far below float32's resolution of a sum of 1.
EXP_FLOOR = -40.0


def _exp_floored_(t: torch.Tensor) -> torch.Tensor:
    """``exp`` in place of arguments ``<= 0``, held at ``exp(EXP_FLOOR)`` from below (-inf too)."""
    return t.clamp_min_(EXP_FLOOR).exp_()


def _softmax_floored(z: torch.Tensor):
    """``(softmax(z), logsumexp(z))`` over dim 1, its terms held at ``exp(EXP_FLOOR)`` from below;
    ``z`` is left as it is."""
    m = z.amax(1, keepdim=True)
    p = _exp_floored_(z - m)
    se = p.sum(1, keepdim=True)
    return p.div_(se), se.log_().add_(m)


def _teacher_probs(logp: torch.Tensor) -> torch.Tensor:
    """The teacher's probabilities from its log-probabilities, those below ``exp(EXP_FLOOR)`` as 0."""
    return logp.clamp_min(EXP_FLOOR).exp_().masked_fill_(logp < EXP_FLOOR, 0.0)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss, per voxel, averaged (``T^2`` keeps gradients T-independent)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1).mean() * t * t


def kd_loss_topk(student_logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """``T^2 KL(teacher || student)`` per voxel, averaged, on the (top-k, rest) partition.

    Equals ``kd_loss`` when ``k`` is the number of classes. Computed by ``_TopKKL``, one
    pass over the classes each way: on a whole 3 mm patch of 118 classes the autograd chain of
    ``log_softmax``, ``gather``, a masked copy and ``logsumexp`` took about a quarter of a CPU
    training step of a half-width student.
    """
    return _TopKKL.apply(student_logits, t_logp, t_idx, float(temperature))


def kd_loss_topk_plain(student_logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """``kd_loss_topk`` written plainly (``log_softmax``, a masked ``logsumexp``) and differentiated
    by autograd: the reference that tests and ``benchmarks/bench_distill_step.py`` compare with."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    idx = t_idx.long()
    t_logp = t_logp.float().clamp_min(LOGP_FLOOR)
    p_k = t_logp.exp()
    kl = (p_k * (t_logp - log_q.gather(1, idx))).sum(1)
    if idx.shape[1] < student_logits.shape[1]:
        p_rest = (1.0 - p_k.sum(1)).clamp_min(0.0)
        log_q_rest = torch.logsumexp(log_q.scatter(1, idx, float("-inf")), dim=1)
        log_p_rest = torch.log(p_rest.clamp_min(1e-12))
        kl = kl + torch.where(p_rest > 0, p_rest * (log_p_rest - log_q_rest), torch.zeros_like(p_rest))
    return kl.mean() * t * t


class _TopKKL(torch.autograd.Function):
    """The top-k KL loss with its gradient in closed form, in the log domain.

    With ``q = softmax(s / T)``, the teacher's top-k probabilities ``p_k`` and the rest of its mass
    ``p_r``, the gradient per voxel is ``T (S q_j - P_j) / N``: ``P_j = p_j`` on the top-k classes
    and ``p_r q_j / q_r`` on the rest (the teacher's rest mass spread as the student spreads its
    own), ``S = sum p_k + p_r`` (1 unless rounding made ``sum p_k`` exceed 1) and ``N`` the voxels
    averaged over. The rest is summed relative to its own largest logit, so nothing underflows
    where the student's logits spread far (trained networks' do).
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor, t: float) -> torch.Tensor:
        z = s.detach().float() / t               # a new tensor: masked in place below
        idx = t_idx.long()
        logp_k = t_logp.float().clamp_min(LOGP_FLOOR)
        p_k = _teacher_probs(logp_k)
        z_k = z.gather(1, idx)
        lse_k = z_k.logsumexp(1, keepdim=True)
        has_rest = idx.shape[1] < z.shape[1]
        e_r = m_r = rest = None
        if has_rest:
            z.scatter_(1, idx, float("-inf"))    # the classes outside the teacher's top k
            m_r = z.amax(1, keepdim=True)
            e_r = _exp_floored_(z.sub_(m_r))     # exp(z - max of the rest); top-k classes: floor, unused
            e_r.scatter_(1, idx, 0.0)
            rest = e_r.sum(1, keepdim=True)      # at least 1
            log_rest = m_r + rest.log()
            lse = torch.logaddexp(lse_k, log_rest)
            p_rest = (1.0 - p_k.sum(1, keepdim=True)).clamp_min(0.0)
        else:
            lse = lse_k
            p_rest = torch.zeros_like(lse)
        kl = (p_k * (logp_k - (z_k - lse))).sum(1, keepdim=True)
        if has_rest:
            log_p_rest = p_rest.clamp_min(torch.finfo(torch.float32).tiny).log()
            kl = kl + torch.where(p_rest > 0, p_rest * (log_p_rest - (log_rest - lse)), torch.zeros_like(kl))
        ctx.save_for_backward(e_r, m_r, rest, z_k, lse, idx, p_k, p_rest)
        ctx.t, ctx.n, ctx.dtype, ctx.shape = t, kl.numel(), s.dtype, s.shape
        return kl.mean() * t * t

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        e_r, m_r, rest, z_k, lse, idx, p_k, p_rest = ctx.saved_tensors
        scale = grad_out.float() * ctx.t / ctx.n
        big_s = p_k.sum(1, keepdim=True) + p_rest
        if e_r is not None:  # S q_j - p_r q_j / q_r = e_j (S exp(m_r - lse) - p_r / rest)
            grad = e_r * ((big_s * _exp_floored_(m_r - lse) - p_rest / rest) * scale)
        else:
            grad = torch.zeros(ctx.shape, dtype=torch.float32, device=z_k.device)
        grad.scatter_(1, idx, (big_s * _exp_floored_(z_k - lse) - p_k) * scale)
        return grad.to(ctx.dtype), None, None, None


def nnunet_dice_ce() -> nn.Module:
    """nnU-Net's default segmentation loss (Dice + CE), as its trainer builds it: the reference
    ``dice_ce_loss`` equals."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return DC_and_CE_loss({"batch_dice": True, "smooth": DICE_SMOOTH, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None,
                          dice_class=MemoryEfficientSoftDiceLoss)


def dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """nnU-Net's Dice + CE of ``logits`` (B, C, ...) against ``labels`` (B, 1, ...), computed by
    ``_DiceCE``: on a whole 3 mm patch of 118 classes nnU-Net's module (softmax, a one-hot copy,
    autograd through both) took about as long as the student's own backward pass."""
    return _DiceCE.apply(logits, labels)


class _DiceCE(torch.autograd.Function):
    """Cross-entropy plus batch soft Dice over the foreground classes, gradient in closed form.

    With ``p = softmax(z)``, the label ``l`` per voxel, ``N`` voxels and per foreground class ``c``
    the overlap ``I_c = sum p_c [l = c]``, ``D_c = sum p_c + #[l = c] + smooth`` and
    ``dc_c = (2 I_c + smooth) / D_c``, the loss is ``mean(-log p_l) - mean_c dc_c``. Its gradient
    with respect to ``p_c`` is ``g_c = b_c + a_c [l = c]`` with ``a_c = -2 / (F D_c)`` and
    ``b_c = dc_c / (F D_c)`` (``F`` foreground classes; 0 for the background), so the gradient
    in the logits is ``p_j (g_j - sum_c p_c g_c) + (p_j - [l = j]) / N``.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = s.detach().float()
        lab = labels.long().view(z.shape[0], 1, *z.shape[2:])
        p, lse = _softmax_floored(z)
        n, classes = lab.numel(), z.shape[1]
        axes = [0] + list(range(2, z.ndim))
        ce = (lse - z.gather(1, lab)).sum() / n
        p_l = p.gather(1, lab)
        flat = lab.flatten()
        inter = torch.zeros(classes, dtype=torch.float32, device=z.device).index_add_(0, flat, p_l.flatten())
        sum_gt = torch.bincount(flat, minlength=classes).to(torch.float32)
        denom = (sum_gt + p.sum(axes, dtype=torch.float32) + DICE_SMOOTH).clamp_min(1e-8)
        dc = (2.0 * inter + DICE_SMOOTH) / denom
        ctx.save_for_backward(p, lab, p_l, denom, dc)
        ctx.n, ctx.dtype = n, s.dtype
        return ce - dc[1:].mean()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        p, lab, p_l, denom, dc = ctx.saved_tensors
        fg = p.shape[1] - 1
        a = -2.0 / (fg * denom)
        b = dc / (fg * denom)
        a[0] = b[0] = 0.0
        shape = (1, -1) + (1,) * (p.ndim - 2)
        # sum_c p_c g_c per voxel: the label's own term plus the b-weighted sum over classes
        s_v = a[lab] * p_l + torch.einsum("bc...,c->b...", p, b).unsqueeze(1)
        scale = grad_out.float()
        grad = p * (b.view(shape) + 1.0 / ctx.n - s_v)
        grad.scatter_add_(1, lab, a[lab] * p_l - 1.0 / ctx.n)
        return (grad * scale).to(ctx.dtype), None


def fast_recipe_loss(logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor,
                     kd_weight: float = 1.0, dice_ce_weight: float = 1.0, chunk: int = 4096) -> torch.Tensor:
    """``kd_weight * kd_loss_topk + dice_ce_weight * dice_ce_loss`` (pseudo labels: the teacher's
    top-1 class) at temperature 1, in one Function that walks the voxels in chunks.

    Why: apart, the two losses made a dozen passes over the (118 classes x 1.6 M voxels) logits of a
    whole 3 mm patch, each a trip through memory; together they cost as much as the student's
    forward and backward on 2 CPU cores. Here each chunk of ``chunk`` voxels is read once forward
    and once backward while it sits in cache, and the softmax is shared. ``logits`` may be
    bfloat16 (autocast's output) and in either memory layout; the gradient comes back in both.
    """
    return _FastRecipeLoss.apply(logits, t_logp, t_idx, float(kd_weight), float(dice_ce_weight), int(chunk))


def _voxels_by_classes(t: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` as ``(voxels, C)``: a view for channels-last tensors, else a copy."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


class _FastRecipeLoss(torch.autograd.Function):
    """Forward: per chunk, the softmax, the top-k KL (as ``_TopKKL``), CE and the Dice sums.
    Backward: per chunk, the softmax again from the stored log-normaliser, and both gradients (as
    ``_TopKKL`` and ``_DiceCE`` state them), written straight into the result. The (voxels, classes)
    views forward built are kept for backward (for channels-last logits, views without a copy)."""

    @staticmethod
    def forward(ctx, s, t_logp, t_idx, kd_weight, dice_ce_weight, chunk):
        z2 = _voxels_by_classes(s.detach())
        logp2 = _voxels_by_classes(t_logp).float().clamp_min_(LOGP_FLOOR)
        idx2 = _voxels_by_classes(t_idx).long()
        n, classes = z2.shape
        k = idx2.shape[1]
        lse = torch.empty(n, 1, dtype=torch.float32, device=s.device)
        log_rest = torch.empty_like(lse) if k < classes else None
        p_rest = torch.empty_like(lse) if k < classes else None
        sum_pred = torch.zeros(classes, dtype=torch.float32, device=s.device)
        inter = torch.zeros_like(sum_pred)
        kl_sum = ce_sum = 0.0
        for v0 in range(0, n, chunk):
            sl = slice(v0, min(n, v0 + chunk))
            z, idx, logp_k = z2[sl].to(torch.float32, copy=True), idx2[sl], logp2[sl]
            lab = idx[:, :1]
            q, lse_c = _softmax_floored(z)
            lse[sl] = lse_c
            sum_pred += q.sum(0)
            inter.index_add_(0, lab[:, 0], q.gather(1, lab)[:, 0])
            ce_sum += float((lse_c - z.gather(1, lab)).sum())
            p_k = _teacher_probs(logp_k)
            kl = (p_k * (logp_k - (z.gather(1, idx) - lse_c))).sum(1, keepdim=True)
            if log_rest is not None:
                z_r = z.scatter_(1, idx, float("-inf"))  # z is a chunk copy: masked in place
                m_r = z_r.amax(1, keepdim=True)
                lr = _exp_floored_(z_r.sub_(m_r)).scatter_(1, idx, 0.0).sum(1, keepdim=True).log_().add_(m_r)
                log_rest[sl] = lr
                p_r = (1.0 - p_k.sum(1, keepdim=True)).clamp_min(0.0)
                p_rest[sl] = p_r
                log_p_rest = p_r.clamp_min(torch.finfo(torch.float32).tiny).log()
                kl = kl + torch.where(p_r > 0, p_r * (log_p_rest - (lr - lse_c)), torch.zeros_like(kl))
            kl_sum += float(kl.sum())
        sum_gt = torch.bincount(idx2[:, 0], minlength=classes).to(torch.float32)
        denom = (sum_gt + sum_pred + DICE_SMOOTH).clamp_min(1e-8)
        dc = (2.0 * inter + DICE_SMOOTH) / denom
        ctx.save_for_backward(z2, logp2, idx2, lse, log_rest, p_rest, denom, dc)
        ctx.weights, ctx.chunk, ctx.dtype, ctx.shape = (kd_weight, dice_ce_weight), chunk, s.dtype, s.shape
        total = kd_weight * kl_sum / n + dice_ce_weight * (ce_sum / n - float(dc[1:].mean()))
        return torch.tensor(total, dtype=torch.float32, device=s.device)

    @staticmethod
    def backward(ctx, grad_out):
        z2, logp2, idx2, lse, log_rest, p_rest, denom, dc = ctx.saved_tensors
        kd_weight, dice_ce_weight = ctx.weights
        n, classes = z2.shape
        scale = float(grad_out)
        fg = classes - 1
        a = -2.0 / (fg * denom)
        b = dc / (fg * denom)
        a[0] = b[0] = 0.0
        w_kd, w_dc = kd_weight * scale / n, dice_ce_weight * scale
        grad2 = torch.empty(n, classes, dtype=ctx.dtype, device=z2.device)
        for v0 in range(0, n, ctx.chunk):
            sl = slice(v0, min(n, v0 + ctx.chunk))
            z, idx = z2[sl].to(torch.float32, copy=True), idx2[sl]
            lab = idx[:, :1]
            p_k = _teacher_probs(logp2[sl])
            q = _exp_floored_(z - lse[sl])
            q_l = q.gather(1, lab)
            a_l = a[lab]
            # Dice + CE: q_j (b_j + 1/N - s_v) + [j = l] (a_l q_l - 1/N)
            s_v = a_l * q_l + q @ b.unsqueeze(1)
            g = q * (b * w_dc + (w_dc / n) - w_dc * s_v)
            g.scatter_add_(1, lab, w_dc * (a_l * q_l - 1.0 / n))
            # top-k KL: (S q_j - P_j) / N, P_j = p_j on the top k, p_r q_j / q_r on the rest
            big_s = p_k.sum(1, keepdim=True)
            if p_rest is not None:
                big_s = big_s + p_rest[sl]
            g.add_(q * (w_kd * big_s))
            if p_rest is not None:  # q_j / q_r off the top k, 0 on it
                g.sub_(_exp_floored_(z.sub_(log_rest[sl])).scatter_(1, idx, 0.0).mul_(w_kd * p_rest[sl]))
            g.scatter_add_(1, idx, -w_kd * p_k)
            grad2[sl] = g
        grad = grad2.reshape(ctx.shape[0], *ctx.shape[2:], classes).movedim(-1, 1)
        return grad, None, None, None, None, None
