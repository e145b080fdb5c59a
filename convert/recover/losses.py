"""What the distillation minimises and at which rate: the per-token loss (KL to the teacher, cross-entropy, hidden
states), the learning-rate schedule, and the held-out NLL of the validation curve (``convert.nll``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import MLAError
from ..nll import perplexity
from .config import RecoverConfig


def lr_at(step: int, cfg: RecoverConfig, total_steps: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    factor = 1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * factor)


def topk_targets(logits: torch.Tensor, k: int, temperature: float):
    """The teacher's distribution at ``temperature`` over its top ``k`` tokens (at most vocabulary - 1) and one bucket
    for the rest: (log-probabilities (..., k), token ids (..., k) int32, the rest's log-probability (...,))."""
    logp = F.log_softmax(logits.float() / temperature, -1)  # (..., V)
    values, ids = logp.topk(min(k, logp.shape[-1] - 1), dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return values, ids.int(), rest


def topk_kl(student_logits: torch.Tensor, target, temperature: float) -> torch.Tensor:
    """KL(teacher || student) over the k + 1 buckets of ``target`` (``topk_targets``), mean over positions, scaled
    by temperature^2 as the full KL is; with k = vocabulary - 1 it is the full KL."""
    values, ids, rest = target  # (N, k), (N, k), (N,)
    s = F.log_softmax(student_logits.float() / temperature, -1)  # (N, V)
    ids = ids.long()
    s_top = s.gather(-1, ids)  # (N, k)
    s_rest = s.scatter(-1, ids, float("-inf")).logsumexp(-1)  # (N,)
    kl = (values.exp() * (values - s_top)).sum(-1) + rest.exp() * (rest - s_rest)
    return kl.mean() * temperature**2


def distill_loss(student_out, teacher_out, input_ids, cfg: RecoverConfig, target=None):
    """(loss, kl, ce, hidden) averaged over tokens; KL at every position (to the teacher's cached top-k ``target``,
    flattened to (B*T, k), when given), cross-entropy on next tokens."""
    s = student_out.logits.float().flatten(0, 1)  # (B*T, V)
    zero = torch.zeros((), device=s.device)
    kl = ce = hidden = zero
    if cfg.kd_weight and target is not None:
        kl = topk_kl(s, target, cfg.temperature)
    elif cfg.kd_weight:
        t = teacher_out.logits.float().flatten(0, 1)
        temp = cfg.temperature
        kl = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                      reduction="batchmean") * temp**2
    if cfg.ce_weight:
        logits = student_out.logits[:, :-1].float().flatten(0, 1)
        ce = F.cross_entropy(logits, input_ids[:, 1:].flatten())
    if cfg.hidden_weight:
        if len(student_out.hidden_states) != len(teacher_out.hidden_states):
            raise MLAError("hidden_weight needs a teacher with as many layers as the student")
        pairs = list(zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:], strict=True))  # layer outputs
        hidden = sum(((hs.float() - ht.float()).pow(2).sum(-1) / ht.float().pow(2).sum(-1).clamp_min(1e-6)).mean()
                     for hs, ht in pairs) / len(pairs)
    loss = cfg.kd_weight * kl + cfg.ce_weight * ce + cfg.hidden_weight * hidden
    return loss, kl.detach(), ce.detach(), hidden.detach()


def val_nll(model, windows: torch.LongTensor, batch_size: int) -> float:
    """Mean next-token negative log-likelihood over the windows (the measure eval.perplexity reports)."""
    return math.log(perplexity(model, windows, batch_size, desc="val"))
