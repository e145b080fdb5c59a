"""Stage 3, RoPE split: choose which key directions keep RoPE (the shared ``kpe``) and which join the latent.

Keys of all g KV heads are stacked (``g * d_h``). Frequency pair ``i`` of head ``j`` is dims ``(j*d_h + i,
j*d_h + i + d_h/2)``. An orthogonal ``U_i`` (g x g) mixing the heads' pair ``i`` (the same ``U_i`` on real and
imaginary parts) commutes with RoPE, so applying it to keys and queries leaves every score unchanged (DESIGN.md).
The result is an orthogonal ``R`` over the stacked key space whose first ``d_rope`` rows become ``kpe`` (rotate-half
layout: real parts of the kept pairs, then imaginary parts) and whose other rows lose RoPE.

Methods:
- ``rotate``: ``U_i`` = PCA of the calibration keys' frequency-``i`` components across heads; keep the rotated
  components with the largest ``||q|| * ||k||`` (calibrated query and key energy).
- ``norm``: no rotation (MHA2MLA 2-norm): every KV head keeps its pairs with the largest ``||q|| * ||k||``.
- ``high``: no rotation: every KV head keeps its highest-frequency pairs.
- ``uniform``: no rotation: every KV head keeps evenly spaced frequencies.
Without rotation the kept pairs are shared out round-robin, so each KV head keeps ``d_rope / (2 g)`` of them.
"""

from dataclasses import dataclass

import torch

from .errors import MLAError

ROPE_METHODS = ("rotate", "norm", "high", "uniform")


@dataclass
class RopeSplit:
    rotation: torch.Tensor  # (g*d_h, g*d_h) orthogonal; rows [kept re | kept im | no-RoPE]
    freq_index: list[int]  # frequency of each kept pair, len d_rope / 2
    d_rope: int


def _pair_rows(num_kv: int, head_dim: int, i: int) -> tuple[list[int], list[int]]:
    half = head_dim // 2
    return [j * head_dim + i for j in range(num_kv)], [j * head_dim + i + half for j in range(num_kv)]


def rope_split(k_aug, q_aug, moments, num_kv: int, head_dim: int, d_rope: int, method: str) -> RopeSplit:
    """Build the RoPE split of one layer from its augmented k/q weights ``[W b]`` and input moments ``E[x~ x~^T]``."""
    if method not in ROPE_METHODS:
        raise MLAError(f"unknown rope method {method!r}; choose from {', '.join(ROPE_METHODS)}")
    if d_rope % 2 or not 0 <= d_rope <= num_kv * head_dim:
        raise MLAError(f"rope dim {d_rope} must be even and between 0 and {num_kv * head_dim}")
    half, n_pairs = head_dim // 2, d_rope // 2
    num_heads = q_aug.shape[0] // head_dim
    group = num_heads // num_kv
    cov_k = k_aug @ moments @ k_aug.T  # (g*d_h, g*d_h)
    q_diag = ((q_aug @ moments) * q_aug).sum(1)  # (n_h*d_h,) E[q^2] per query dim
    q_energy = torch.zeros(half, num_kv, dtype=torch.float64)  # per frequency, per KV group, summed over its heads
    for h in range(num_heads):
        q_energy[:, h // group] += q_diag[h * head_dim : h * head_dim + half] + q_diag[h * head_dim + half : (h + 1) * head_dim]

    rotations, scores = [], []  # per frequency: U_i (rows = components), score per component
    for i in range(half):
        re, im = _pair_rows(num_kv, head_dim, i)
        c_i = cov_k[re][:, re] + cov_k[im][:, im]  # (g, g)
        if method == "rotate" and n_pairs < half * num_kv:  # with every component kept no rotation is needed
            evals, evecs = torch.linalg.eigh(c_i)
            order = torch.argsort(evals, descending=True)
            u = evecs[:, order].T.contiguous()  # rows = components
            k_e = evals[order].clamp_min(0)
        else:
            u = torch.eye(num_kv, dtype=torch.float64)
            k_e = torch.diagonal(c_i).clamp_min(0)
        q_e = (u**2) @ q_energy[i]  # rotated query energy per component
        if method in ("rotate", "norm"):
            score = (k_e * q_e).sqrt()
        elif method == "high":
            score = torch.full((num_kv,), float(half - i))
        else:  # uniform: rank frequencies by a stride that spreads the first picks evenly
            score = torch.full((num_kv,), float(half - _uniform_rank(i, half, -(-n_pairs // num_kv))))
        rotations.append(u)
        scores.append(score)

    if method == "rotate":  # rotated components are shared by all heads: one global ranking
        flat = [(float(scores[i][c]), -i, -c) for i in range(half) for c in range(num_kv)]
        ranked = sorted(range(len(flat)), key=lambda t: flat[t], reverse=True)
        kept = sorted((t // num_kv, t % num_kv) for t in ranked[:n_pairs])  # (i, c) in frequency order
    else:  # MHA2MLA-style: every KV head keeps its own best pairs, round-robin across heads
        per_head = [sorted(range(half), key=lambda i: (float(scores[i][c]), -i), reverse=True) for c in range(num_kv)]
        order = [(per_head[c][k], c) for k in range(half) for c in range(num_kv)]
        kept = sorted(order[:n_pairs])
    kept_set = set(kept)
    rest = [(i, c) for i in range(half) for c in range(num_kv) if (i, c) not in kept_set]

    dim = num_kv * head_dim
    rows_re, rows_im, rows_rest = [], [], []
    for i, c in kept + rest:
        re, im = _pair_rows(num_kv, head_dim, i)
        row_re = torch.zeros(dim, dtype=torch.float64)
        row_im = torch.zeros(dim, dtype=torch.float64)
        row_re[re] = rotations[i][c]
        row_im[im] = rotations[i][c]
        if (i, c) in kept_set:
            rows_re.append(row_re)
            rows_im.append(row_im)
        else:
            rows_rest += [row_re, row_im]
    rotation = torch.stack(rows_re + rows_im + rows_rest) if dim else torch.zeros(0, 0, dtype=torch.float64)
    return RopeSplit(rotation=rotation, freq_index=[i for i, _ in kept], d_rope=d_rope)


def _uniform_rank(i: int, half: int, n: int) -> float:
    """0 for the n evenly spaced frequencies ``round(k * half / n)``, larger for the others (later picks)."""
    picks = [min(half - 1, (k * half) // max(n, 1)) for k in range(n)]
    return 0.0 if i in picks else 1.0 + i / half
