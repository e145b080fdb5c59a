"""Stage 3, RoPE split: choose which key directions keep RoPE (the shared ``kpe``) and which join the latent.

Keys of all g KV heads are stacked (``g * d_h``). RoPE rotates the first ``rotary_dim`` (``d_rot``, ``d_h`` unless
the source has partial rotary embeddings; 0 in a layer without RoPE) dims of each head: frequency pair ``i`` of head
``j`` is dims ``(j*d_h + i, j*d_h + i + d_rot/2)``; the other dims never rotate and always join the latent. An orthogonal ``U_i`` (g x g) mixing the heads' pair ``i`` (the same ``U_i`` on real and
imaginary parts) commutes with RoPE, so applying it to keys and queries leaves every score unchanged (DESIGN.md).
The result is an orthogonal ``R`` over the stacked key space whose first ``d_rope`` rows become ``kpe`` (rotate-half
layout: real parts of the kept pairs, then imaginary parts) and whose other rows lose RoPE.

Methods:
- ``rotate`` (default): ``U_i`` = PCA of the frequency-``i`` key components across heads, weighted by the loss
  gradient (``LayerStats.cov_k``); each rotated component is scored by the loss it would cost without RoPE:
  ``(1 - sinc(theta_i * span)) * E[|g|^2 k_c^2] * (gradient share of the component)``. The first factor is the mean
  of ``1 - cos(theta_i * delta)`` over distances ``delta`` in ``[0, span]``: a slow frequency hardly rotates over the
  span, so dropping its RoPE costs little however large its norm. Scores are in the units of the latent's
  eigenvalues (estimated nats), so RoPE width can be allocated across layers with the latent ranks.
- ``rotate-norm``: the same rotation from plain key moments, components scored by ``||q|| * ||k||``.
- ``norm``: no rotation (MHA2MLA 2-norm): every KV head keeps its pairs with the largest ``||q|| * ||k||``.
- ``high``: no rotation: every KV head keeps its highest-frequency pairs.
- ``uniform``: no rotation: every KV head keeps evenly spaced frequencies.
Without rotation the kept pairs are shared out round-robin, so each KV head keeps ``d_rope / (2 g)`` of them.
"""

import math
from dataclasses import dataclass

import torch

from .errors import MLAError

ROPE_METHODS = ("rotate", "rotate-norm", "norm", "high", "uniform")


@dataclass
class RopeSplit:
    rotation: torch.Tensor  # (g*d_h, g*d_h) orthogonal; rows [kept re | kept im | no-RoPE]
    freq_index: list[int]  # frequency of each kept pair, len d_rope / 2
    d_rope: int


def _pair_rows(num_kv: int, head_dim: int, i: int, rotary_dim: int) -> tuple[list[int], list[int]]:
    half = rotary_dim // 2
    return [j * head_dim + i for j in range(num_kv)], [j * head_dim + i + half for j in range(num_kv)]


def component_scores(stats, num_kv: int, head_dim: int, num_heads: int, method: str, theta, span: int,
                     rotary_dim: int | None = None):
    """``(rotations, scores)``: per frequency ``i`` the ``U_i`` (rows = components) and each component's score
    (``theta``: the angular rate of each of the ``rotary_dim / 2`` frequencies).

    ``stats`` (``calibrate.LayerStats``) may be None for the methods that need no data (``high``, ``uniform``)."""
    if method not in ROPE_METHODS:
        raise MLAError(f"unknown rope method {method!r}; choose from {', '.join(ROPE_METHODS)}")
    if method == "rotate" and not (stats is not None and stats.has_gradients):
        raise MLAError("rope method 'rotate' needs gradient statistics")
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    half, dim = rotary_dim // 2, num_kv * head_dim
    group = num_heads // num_kv
    weighted = method == "rotate"
    if stats is None:
        cov_k = torch.zeros(dim, dim, dtype=torch.float64)
        q_diag = torch.zeros(num_heads * head_dim, dtype=torch.float64)
    else:
        cov_k = (stats.cov_k if weighted else stats.cov)[:dim, :dim]  # (g*d_h, g*d_h) key block
        q_diag = stats.q_energy  # (n_h*d_h,) E[q^2] per query dim
    q_energy = torch.zeros(half, num_kv, dtype=torch.float64)  # per frequency, per KV group, summed over its heads
    for h in range(num_heads):
        q_energy[:, h // group] += q_diag[h * head_dim : h * head_dim + half] + q_diag[h * head_dim + half : h * head_dim + 2 * half]

    rotations, scores = [], []
    for i in range(half):
        re, im = _pair_rows(num_kv, head_dim, i, rotary_dim)
        c_i = cov_k[re][:, re] + cov_k[im][:, im]  # (g, g)
        if method in ("rotate", "rotate-norm") and num_kv > 1:
            evals, evecs = torch.linalg.eigh(c_i)
            order = torch.argsort(evals, descending=True)
            u = evecs[:, order].T.contiguous()  # rows = components
            k_e = evals[order].clamp_min(0)
        else:
            u = torch.eye(num_kv, dtype=torch.float64)
            k_e = torch.diagonal(c_i).clamp_min(0)
        if method == "rotate":
            g_i = stats.grad_k[re][:, re] + stats.grad_k[im][:, im]  # (g, g)
            x = theta[i] * span
            spin = 1 - math.sin(x) / x if x > 0 else 0.0
            score = spin * k_e * torch.einsum("cj,jk,ck->c", u, g_i, u) / 2
        elif method in ("rotate-norm", "norm"):
            score = (k_e * ((u**2) @ q_energy[i])).sqrt()
        elif method == "high":
            score = torch.full((num_kv,), float(half - i))
        else:
            score = torch.full((num_kv,), 0.0)  # uniform: set by position in _select
        rotations.append(u)
        scores.append(score)
    return rotations, torch.stack(scores) if scores else torch.zeros(0, num_kv, dtype=torch.float64)  # (half, g)


def _select(scores: torch.Tensor, method: str, n_pairs: int) -> list[tuple[int, int]]:
    half, num_kv = scores.shape
    if method in ("rotate", "rotate-norm"):  # rotated components are shared by all heads: one global ranking
        flat = [(float(scores[i, c]), -i, -c) for i in range(half) for c in range(num_kv)]
        ranked = sorted(range(len(flat)), key=lambda t: flat[t], reverse=True)
        return sorted((t // num_kv, t % num_kv) for t in ranked[:n_pairs])
    if method == "uniform":  # evenly spaced frequencies first, round-robin over heads
        n = -(-n_pairs // num_kv)
        picks = [min(half - 1, (k * half) // max(n, 1)) for k in range(n)]
        per_head = [picks + [i for i in range(half) if i not in picks]] * num_kv
    else:  # MHA2MLA-style: every KV head keeps its own best pairs, round-robin across heads
        per_head = [sorted(range(half), key=lambda i: (float(scores[i, c]), -i), reverse=True) for c in range(num_kv)]
    order = [(per_head[c][k], c) for k in range(half) for c in range(num_kv)]
    return sorted(order[:n_pairs])


def strided_pairs(scores: torch.Tensor, stride: int, n_pairs: int) -> list[tuple[int, int]]:
    """One RoPE component per kept frequency, the kept frequencies every ``stride``-th (0, stride, 2*stride, ...): at
    each, the best-scoring rotated component (what a stock DeepSeek RoPE of ``2 * n_pairs`` dims can carry)."""
    half = scores.shape[0]
    if n_pairs and (n_pairs - 1) * stride >= half:
        raise MLAError(f"{n_pairs} RoPE frequencies every {stride}-th do not fit in {half}")
    return [(j * stride, int(torch.argmax(scores[j * stride]))) for j in range(n_pairs)]


def rope_split(stats, num_kv: int, head_dim: int, num_heads: int, d_rope: int, method: str, theta, span: int,
               scored=None, rotary_dim: int | None = None, stride: int | None = None) -> RopeSplit:
    """The RoPE split of one layer from its calibration statistics (``scored``: ``component_scores`` already
    computed for this layer, reused instead of recomputed; ``stride``: keep one component at every ``stride``-th
    frequency, see ``strided_pairs``)."""
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    if d_rope % 2 or not 0 <= d_rope <= num_kv * rotary_dim:
        raise MLAError(f"rope dim {d_rope} must be even and between 0 and {num_kv * rotary_dim}")
    half, n_pairs = rotary_dim // 2, d_rope // 2
    if n_pairs == half * num_kv and stride is None:  # everything keeps RoPE: identity, exactly lossless
        method, scored = "high", None
    if scored is None:
        scored = component_scores(stats, num_kv, head_dim, num_heads, method, theta, span, rotary_dim)
    rotations, scores = scored
    kept = _select(scores, method, n_pairs) if stride is None else strided_pairs(scores, stride, n_pairs)
    kept_set = set(kept)
    rest = [(i, c) for i in range(half) for c in range(num_kv) if (i, c) not in kept_set]

    dim = num_kv * head_dim
    rows_re, rows_im, rows_rest = [], [], []
    for i, c in kept + rest:
        re, im = _pair_rows(num_kv, head_dim, i, rotary_dim)
        row_re = torch.zeros(dim, dtype=torch.float64)
        row_im = torch.zeros(dim, dtype=torch.float64)
        row_re[re] = rotations[i][c]
        row_im[im] = rotations[i][c]
        if (i, c) in kept_set:
            rows_re.append(row_re)
            rows_im.append(row_im)
        else:
            rows_rest += [row_re, row_im]
    eye = torch.eye(dim, dtype=torch.float64)
    rows_rest += [eye[j * head_dim + k] for j in range(num_kv) for k in range(rotary_dim, head_dim)]  # never rotated
    rotation = torch.stack(rows_re + rows_im + rows_rest) if dim else torch.zeros(0, 0, dtype=torch.float64)
    return RopeSplit(rotation=rotation, freq_index=[i for i, _ in kept], d_rope=d_rope)

