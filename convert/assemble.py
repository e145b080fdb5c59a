"""Stage 5, assemble: turn one source attention layer into DeepSeek-V3 MLA weights.

Per query head h of KV group j (``d_nope = v_head_dim = d_h``):
- ``q_proj`` rows: ``[W_q,h ; R_pe[:, group j] W_q,h]``, scaled by ``sqrt(d_h + d_rope) / sqrt(d_h)`` so that MLA's
  softmax scale ``1/sqrt(d_nope + d_rope)`` sees the original logits.
- ``kv_a_proj_with_mqa`` rows: ``[A ; R_pe W_k]`` (latent, then the shared RoPE key).
- ``kv_b_proj`` rows: ``[R_nope[:, group j]^T B_k ; B_v[group j]]`` (key up-projection maps the latent back into
  head h's own query space, so ``q_h . k_h`` equals the rotated no-RoPE score).
"""

import math
from dataclasses import dataclass

import torch

from .errors import MLAError
from .factorize import LatentStats, joint_latent, latent_spectrum
from .ropesplit import RopeSplit, component_scores, rope_split


@dataclass
class LayerPlan:
    """Ranks of one layer: latent width ``rank`` and decoupled RoPE width ``d_rope``."""

    rank: int
    d_rope: int


@dataclass
class AttentionWeights:
    """One source attention layer in float64: ``[W b]`` of q, k, v (bias column zero when absent) and o."""

    q_aug: torch.Tensor  # (n_h*d_h, d+1)
    k_aug: torch.Tensor  # (g*d_h, d+1)
    v_aug: torch.Tensor  # (g*d_h, d+1)
    o_weight: torch.Tensor  # (d, n_h*d_h)
    o_bias: torch.Tensor | None


def _aug(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    w = w.to(torch.float64)
    b = b.to(torch.float64) if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return torch.cat((w, b[:, None]), dim=1)


def read_attention(reader, i: int) -> AttentionWeights:
    """Layer ``i``'s attention tensors from a ``layerwise.TensorReader``."""
    p = f"model.layers.{i}.self_attn."
    names = reader.names()
    want = [p + f"{m}_proj.{t}" for m in "qkvo" for t in ("weight", "bias") if p + f"{m}_proj.{t}" in names]
    got = reader.get(want)
    w = {n[len(p):]: t for n, t in got.items()}
    return AttentionWeights(
        q_aug=_aug(w["q_proj.weight"], w.get("q_proj.bias")),
        k_aug=_aug(w["k_proj.weight"], w.get("k_proj.bias")),
        v_aug=_aug(w["v_proj.weight"], w.get("v_proj.bias")),
        o_weight=w["o_proj.weight"].to(torch.float64),
        o_bias=w["o_proj.bias"].to(torch.float64) if "o_proj.bias" in w else None,
    )


def rope_theta(layout) -> list[float]:
    """Angular rate of each frequency pair of the source RoPE."""
    base = float(layout.rope_parameters.get("rope_theta", 10000.0))
    return [base ** (-2 * i / layout.head_dim) for i in range(layout.head_dim // 2)]


def rope_scores(stats, layout, rope_method: str, span: int):
    """``(rotations, scores)`` of one layer's rotated key components (see ``ropesplit``); scores (d_h/2, g)."""
    return component_scores(stats, layout.num_kv_heads, layout.head_dim, layout.num_heads, rope_method,
                            rope_theta(layout), span)


@dataclass
class Decomposition:
    """One layer's RoPE split and latent problem ``Z = [R_nope K; V] = z_aug x~`` (and its spectrum, once computed)."""

    split: RopeSplit
    z_aug: torch.Tensor  # (D, d+1)
    n_key: int
    stats: LatentStats
    method: str
    spectrum: tuple | None = None  # (evals, basis, metric) of latent_spectrum


def decompose(w: AttentionWeights, stats, layout, d_rope: int, rope_method: str, factor_method: str, span: int,
              scored=None, spectrum: bool = False) -> Decomposition:
    """The RoPE split of one layer and its latent problem; ``spectrum`` also eigen-decomposes it."""
    g, d_h = layout.num_kv_heads, layout.head_dim
    split = rope_split(stats, g, d_h, layout.num_heads, d_rope, rope_method, rope_theta(layout), span, scored)
    r_nope = split.rotation[d_rope:]  # (D_n, g*d_h)
    z_aug = torch.cat((r_nope @ w.k_aug, w.v_aug), dim=0)  # (D_n + g*d_h, d+1)
    transform = torch.block_diag(r_nope, torch.eye(g * d_h, dtype=torch.float64))  # y = [k; v] -> Z
    if factor_method == "fisher" and not (stats is not None and stats.has_gradients):
        raise MLAError("factorization 'fisher' needs gradient statistics")
    dec = Decomposition(split, z_aug, r_nope.shape[0], LatentStats.of(stats, transform, r_nope), factor_method)
    if spectrum:
        dec.spectrum = latent_spectrum(z_aug, dec.n_key, factor_method, dec.stats)
    return dec


def assemble(w: AttentionWeights, dec: Decomposition, layout, rank: int, rope_scaling: float = 1.0):
    """Return the new attention tensors of one layer (float64, names relative to ``self_attn``)."""
    g, d_h, n_h = layout.num_kv_heads, layout.head_dim, layout.num_heads
    group = n_h // g
    d_rope = dec.split.d_rope
    r_pe, r_nope = dec.split.rotation[:d_rope], dec.split.rotation[d_rope:]  # (d_rope, g*d_h), (D_n, g*d_h)
    n_key = dec.n_key
    down, up = joint_latent(dec.z_aug, n_key, rank, dec.method, dec.stats, dec.spectrum)
    up_k, up_v = up[:n_key], up[n_key:]  # (D_n, r), (g*d_h, r)

    scale = math.sqrt(d_h + d_rope) / math.sqrt(d_h)
    q_rows, kv_b_rows = [], []
    for h in range(n_h):
        j = h // group
        cols = slice(j * d_h, (j + 1) * d_h)
        q_h = w.q_aug[h * d_h : (h + 1) * d_h]  # (d_h, d+1)
        q_rows += [q_h * (scale * rope_scaling**2), (r_pe[:, cols] @ q_h) * scale]
        kv_b_rows += [r_nope[:, cols].T @ up_k, up_v[cols]]  # (d_h, r) each
    q_all = torch.cat(q_rows)  # (n_h*(d_h + d_rope), d+1)
    kv_a = torch.cat((down, r_pe @ w.k_aug))  # (r + d_rope, d+1)
    tensors = {
        "q_proj.weight": q_all[:, :-1],
        "kv_a_proj_with_mqa.weight": kv_a[:, :-1],
        "kv_b_proj.weight": torch.cat(kv_b_rows),  # (n_h*2*d_h, r)
        "o_proj.weight": w.o_weight,
    }
    if layout.qkv_bias:
        tensors["q_proj.bias"] = q_all[:, -1]
        tensors["kv_a_proj_with_mqa.bias"] = kv_a[:, -1]
    if w.o_bias is not None:
        tensors["o_proj.bias"] = w.o_bias
    return tensors
