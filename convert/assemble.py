"""Stage 5, assemble: turn one source attention layer into DeepSeek-V3 MLA weights.

Per query head h of KV group j (``d_nope = v_head_dim = d_h``):
- ``q_proj`` rows: ``[W_q,h ; R_pe[:, group j] W_q,h]``, scaled by ``s * sqrt(d_h + d_rope)`` (``s`` the source's
  softmax scale, ``1/sqrt(d_h)`` unless the family sets another) so that MLA's softmax scale
  ``1/sqrt(d_nope + d_rope)`` sees the original logits.
- ``kv_a_proj_with_mqa`` rows: ``[A ; R_pe W_k]`` (latent, then the shared RoPE key).
- ``kv_b_proj`` rows: ``[R_nope[:, group j]^T B_k ; B_v[group j]]`` (key up-projection maps the latent back into
  head h's own query space, so ``q_h . k_h`` equals the rotated no-RoPE score).

With QK-norm (Qwen3, Gemma 3: per head; OLMo 2: over the whole projection) the keys are not linear in the input:
the latent is a projection of the *normalized* keys and the values, ``c = A [k_norm(W_k x); W_v x]``. The export
keeps ``k_proj`` and ``k_norm`` as they are and adds ``k_a_proj`` (``[A_k ; R_pe]`` on the normalized keys); the
value part ``A_v W_v`` (and every bias) stays in ``kv_a_proj_with_mqa``. On the query side ``q_proj`` holds the raw
rows ``[W_q,h ; R_pe W_q,h]`` and ``q_norm`` divides each head by the RMS of its first ``d_h`` columns (the source's
query head) and multiplies by the source's gain (with the scales above folded in), so budget 1 stays exact.
"""

import math
from dataclasses import dataclass

import torch

from .errors import MLAError
from .factorize import LatentStats, joint_latent, latent_spectrum, normalised_latent, output_metric
from .ropesplit import RopeSplit, component_scores, rope_split


@dataclass
class LayerPlan:
    """Ranks of one layer: latent width ``rank`` and decoupled RoPE width ``d_rope``."""

    rank: int
    d_rope: int


@dataclass
class AttentionWeights:
    """One source attention layer in float64: ``[W b]`` of q, k, v (bias column zero when absent) and o, and the
    QK-norm gains (Gemma's ``1 + w`` already added) when the family has them."""

    q_aug: torch.Tensor  # (n_h*d_h, d+1)
    k_aug: torch.Tensor  # (g*d_h, d+1)
    v_aug: torch.Tensor  # (g*d_h, d+1)
    o_weight: torch.Tensor  # (d, n_h*d_h)
    o_bias: torch.Tensor | None
    q_gain: torch.Tensor | None = None  # (d_h,) per head or (n_h*d_h,) whole projection
    k_norm: torch.Tensor | None = None  # the source's k_norm weight, as stored


def _aug(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    w = w.to(torch.float64)
    b = b.to(torch.float64) if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return torch.cat((w, b[:, None]), dim=1)


def read_attention(reader, i: int, layout) -> AttentionWeights:
    """Layer ``i``'s attention weights (float64, biases as an extra column) from a ``readers.TensorReader``."""
    w = layout.attention_tensors(reader, i)
    q_gain = k_norm = None
    if layout.qk_norm:
        q_gain = w["q_norm.weight"].to(torch.float64)
        q_gain = q_gain + 1.0 if layout.decoder.get("rms_norm_unit_offset") else q_gain
        k_norm = w["k_norm.weight"]
    return AttentionWeights(
        q_aug=_aug(w["q_proj.weight"], w.get("q_proj.bias")),
        k_aug=_aug(w["k_proj.weight"], w.get("k_proj.bias")),
        v_aug=_aug(w["v_proj.weight"], w.get("v_proj.bias")),
        o_weight=w["o_proj.weight"].to(torch.float64),
        o_bias=w["o_proj.bias"].to(torch.float64) if "o_proj.bias" in w else None,
        q_gain=q_gain,
        k_norm=k_norm,
    )


def rope_theta(layout, i: int) -> list[float]:
    """Angular rate of each frequency pair of layer ``i``'s source RoPE."""
    return layout.layer_frequencies(i)[0] if layout.layer_rotary_dim(i) else []


def rope_scores(stats, layout, i: int, rope_method: str, span: int):
    """``(rotations, scores)`` of layer ``i``'s rotated key components (see ``ropesplit``); scores (d_rot/2, g)."""
    return component_scores(stats, layout.num_kv_heads, layout.head_dim, layout.num_heads, rope_method,
                            rope_theta(layout, i), span, layout.layer_rotary_dim(i))


@dataclass
class Decomposition:
    """One layer's RoPE split and latent problem ``Z = [R_nope K; V] = z_aug x~`` (and its spectrum, once computed).

    With QK-norm the problem lives on ``y = [k_norm(k); v]`` instead of ``x~``: ``z_aug`` is then the (D, 2 g d_h)
    map ``blockdiag(R_nope, I)``."""

    split: RopeSplit
    z_aug: torch.Tensor  # (D, d+1), or (D, 2g*d_h) with QK-norm
    n_key: int
    stats: LatentStats
    method: str
    spectrum: tuple | None = None  # (evals, basis, metric) of latent_spectrum


def decompose(w: AttentionWeights, stats, layout, i: int, d_rope: int, rope_method: str, factor_method: str,
              span: int, scored=None, spectrum: bool = False, stride: int | None = None) -> Decomposition:
    """The RoPE split of layer ``i`` and its latent problem; ``spectrum`` also eigen-decomposes it (``stride``: one
    RoPE component at every ``stride``-th frequency, ``ropesplit.strided_pairs``)."""
    g, d_h = layout.num_kv_heads, layout.head_dim
    split = rope_split(stats, g, d_h, layout.num_heads, d_rope, rope_method, rope_theta(layout, i), span, scored,
                       layout.layer_rotary_dim(i), stride)
    r_nope = split.rotation[d_rope:]  # (D_n, g*d_h)
    transform = torch.block_diag(r_nope, torch.eye(g * d_h, dtype=torch.float64))  # y = [k; v] -> Z
    if layout.qk_norm:
        if factor_method == "svd":
            raise MLAError("factorization 'svd' works on the weights alone and cannot see the key norm of "
                           f"{layout.model_type}; use fisher or pca")
        z_aug = transform
    else:
        z_aug = torch.cat((r_nope @ w.k_aug, w.v_aug), dim=0)  # (D_n + g*d_h, d+1)
    if factor_method == "fisher" and not (stats is not None and stats.has_gradients):
        raise MLAError("factorization 'fisher' needs gradient statistics")
    dec = Decomposition(split, z_aug, r_nope.shape[0], LatentStats.of(stats, transform, r_nope), factor_method)
    if spectrum:
        dec.spectrum = latent_spectrum(z_aug, dec.n_key, factor_method, dec.stats)
    return dec


def _q_scale(layout, d_rope: int) -> float:
    """Factor on the query rows so that MLA's ``1/sqrt(d_h + d_rope)`` equals the source's softmax scale."""
    if layout.attention_scale is None:
        return math.sqrt(layout.head_dim + d_rope) / math.sqrt(layout.head_dim)
    return layout.attention_scale * math.sqrt(layout.head_dim + d_rope)


def _latent(dec: Decomposition, layout, rank: int, norm_samples: tuple | None, report: dict | None):
    """``(down (r, d+1), up_k (D_n, r), up_v (g*d_h, r), the latent norm's gain or None)``: the joint K/V latent of
    rank ``rank``, normalised and refitted on ``norm_samples`` when given (see ``assemble``)."""
    n_key = dec.n_key
    down, up = joint_latent(dec.z_aug, n_key, rank, dec.method, dec.stats, dec.spectrum)
    latent_gain = None  # the latent norm's gain (kv_a_layernorm), when the latent is normalised
    if norm_samples is not None:
        if layout.qk_norm:
            raise MLAError("a normalised latent (kv_a_layernorm) is not supported with QK-norm")
        metric = dec.spectrum[2] if dec.spectrum is not None else output_metric(n_key, dec.z_aug.shape[0],
                                                                                 dec.method, dec.stats)
        transform, up, fit = normalised_latent(down, up, dec.z_aug, metric, n_key, *norm_samples)
        down = transform @ down  # (r, d+1): the cached latent, normalised by the layer
        latent_gain = torch.ones(rank, dtype=torch.float64)
        if report is not None:
            report.update(fit)
    return down, up[:n_key], up[n_key:], latent_gain


def assemble(w: AttentionWeights, dec: Decomposition, layout, rank: int, rope_scaling: float = 1.0,
             rotary_dim: int | None = None, norm_samples: tuple | None = None, report: dict | None = None):
    """Return the new attention tensors of one layer (float64, names relative to ``self_attn``).

    ``rope_scaling``: the RoPE's attention scaling (YaRN, LongRoPE), which the source applies to the cos/sin of its
    first ``rotary_dim`` dims: the no-RoPE query rows of those dims carry its square.
    ``norm_samples``: ``(x~ (M, d+1), w_k, w_v)`` calibration tokens: the latent is normalised (``kv_a_layernorm``,
    DeepSeek's latent RMSNorm, gain 1) and the up-projection fitted on them (``factorize.normalised_latent``);
    ``report`` receives the fit (relative errors with and without the norm)."""
    g, d_h, n_h = layout.num_kv_heads, layout.head_dim, layout.num_heads
    group = n_h // g
    d_rope = dec.split.d_rope
    r_pe, r_nope = dec.split.rotation[:d_rope], dec.split.rotation[d_rope:]  # (d_rope, g*d_h), (D_n, g*d_h)
    down, up_k, up_v, latent_gain = _latent(dec, layout, rank, norm_samples, report)

    scale = _q_scale(layout, d_rope)
    rotary_dim = d_h if rotary_dim is None else rotary_dim
    nope_scale = torch.ones(d_h, 1, dtype=torch.float64)
    nope_scale[:rotary_dim] = rope_scaling**2  # (d_h, 1)
    normed = layout.qk_norm is not None
    q_rows, kv_b_rows, gains = [], [], []
    for h in range(n_h):
        j = h // group
        cols = slice(j * d_h, (j + 1) * d_h)
        q_h = w.q_aug[h * d_h : (h + 1) * d_h]  # (d_h, d+1)
        if normed:  # raw rows; the scales go into the norm's gain
            gain = w.q_gain if w.q_gain.shape[0] == d_h else w.q_gain[h * d_h : (h + 1) * d_h]  # (d_h,)
            picks = (r_pe[:, cols] != 0).to(torch.float64)  # (d_rope, d_h): the one dim each RoPE row reads
            q_rows += [q_h, r_pe[:, cols] @ q_h]
            gains += [gain * scale * nope_scale[:, 0], (picks @ gain) * scale]
        else:
            q_rows += [q_h * scale * nope_scale, (r_pe[:, cols] @ q_h) * scale]
        kv_b_rows += [r_nope[:, cols].T @ up_k, up_v[cols]]  # (d_h, r) each
    q_all = torch.cat(q_rows)  # (n_h*(d_h + d_rope), d+1)
    if normed:  # down acts on y = [k_norm; v]: keys through k_a_proj, values folded into kv_a_proj_with_mqa
        kv_dim = g * d_h
        k_a = torch.cat((down[:, :kv_dim], r_pe))  # (r + d_rope, g*d_h)
        kv_a = torch.cat((down[:, kv_dim:] @ w.v_aug, torch.zeros(d_rope, w.v_aug.shape[1], dtype=torch.float64)))
    else:
        kv_a = torch.cat((down, r_pe @ w.k_aug))  # (r + d_rope, d+1)
    tensors = {
        "q_proj.weight": q_all[:, :-1],
        "kv_a_proj_with_mqa.weight": kv_a[:, :-1],
        "kv_b_proj.weight": torch.cat(kv_b_rows),  # (n_h*2*d_h, r)
        "o_proj.weight": w.o_weight,
    }
    if latent_gain is not None:
        tensors["kv_a_layernorm.weight"] = latent_gain
    if normed:
        tensors["q_norm.weight"] = torch.cat(gains).view(n_h, d_h + d_rope)
        tensors["k_proj.weight"] = w.k_aug[:, :-1]
        tensors["k_norm.weight"] = w.k_norm
        tensors["k_a_proj.weight"] = k_a
    if layout.qkv_bias:
        tensors["q_proj.bias"] = q_all[:, -1]
        tensors["kv_a_proj_with_mqa.bias"] = kv_a[:, -1]
        if normed:
            tensors["k_proj.bias"] = w.k_aug[:, -1]
    if w.o_bias is not None:
        tensors["o_proj.bias"] = w.o_bias
    return tensors
