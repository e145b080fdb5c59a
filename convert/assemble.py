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
from .factorize import joint_latent, latent_spectrum
from .ropesplit import component_scores, rope_split


@dataclass
class LayerPlan:
    """Ranks of one layer: latent width ``rank`` and decoupled RoPE width ``d_rope``."""

    rank: int
    d_rope: int


def augmented(linear) -> torch.Tensor:
    """``[W b]`` of an nn.Linear in float64 (bias column zero when absent)."""
    w = linear.weight.detach().to(torch.float64).cpu()
    b = linear.bias.detach().to(torch.float64).cpu() if linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return torch.cat((w, b[:, None]), dim=1)


def rope_theta(layout) -> list[float]:
    """Angular rate of each frequency pair of the source RoPE."""
    base = float(layout.rope_parameters.get("rope_theta", 10000.0))
    return [base ** (-2 * i / layout.head_dim) for i in range(layout.head_dim // 2)]


def rope_scores(attn, stats, layout, rope_method: str, span: int) -> torch.Tensor:
    """(d_h/2, g) scores of one layer's rotated key components (see ``ropesplit``)."""
    q_aug, k_aug = augmented(attn.q_proj), augmented(attn.k_proj)
    return component_scores(k_aug, q_aug, stats, layout.num_kv_heads, layout.head_dim, rope_method,
                            rope_theta(layout), span)[1]


def _latent_problem(attn, stats, layout, d_rope: int, rope_method: str, factor_method: str, span: int):
    """The RoPE split of one layer and its latent problem ``Z = [R_nope K; V] = z_aug x~``."""
    g, d_h = layout.num_kv_heads, layout.head_dim
    q_aug, k_aug, v_aug = augmented(attn.q_proj), augmented(attn.k_proj), augmented(attn.v_proj)
    split = rope_split(k_aug, q_aug, stats, g, d_h, d_rope, rope_method, rope_theta(layout), span)
    r_nope = split.rotation[d_rope:]  # (D_n, g*d_h)
    z_aug = torch.cat((r_nope @ k_aug, v_aug), dim=0)  # (D_n + g*d_h, d+1)
    fisher = None
    if factor_method == "fisher":
        if not stats.has_gradients:
            raise MLAError("factorization 'fisher' needs gradient statistics")
        fisher = (r_nope @ stats.grad_k @ r_nope.T, stats.grad_v, stats.moments_k, stats.moments_v)
    return split, q_aug, k_aug, z_aug, fisher


def layer_spectrum(attn, stats, layout, d_rope: int, rope_method: str, span: int) -> torch.Tensor:
    """Fisher eigenvalues (descending) of one layer's latent problem: the loss of dropping each latent direction."""
    split, _, _, z_aug, fisher = _latent_problem(attn, stats, layout, d_rope, rope_method, "fisher", span)
    return latent_spectrum(z_aug, split.rotation.shape[0] - d_rope, "fisher", stats.moments, fisher)[0]


def convert_layer(attn, stats, layout, plan: LayerPlan, rope_method: str, factor_method: str, span: int,
                  rope_scaling: float = 1.0):
    """Return ``(tensors, freq_index)``: the new attention tensors (float64, names relative to ``self_attn``)."""
    g, d_h, n_h = layout.num_kv_heads, layout.head_dim, layout.num_heads
    group = n_h // g
    split, q_aug, k_aug, z_aug, fisher = _latent_problem(attn, stats, layout, plan.d_rope, rope_method, factor_method, span)
    r_pe, r_nope = split.rotation[: plan.d_rope], split.rotation[plan.d_rope :]  # (d_rope, g*d_h), (D_n, g*d_h)
    n_key = r_nope.shape[0]
    down, up = joint_latent(z_aug, n_key, plan.rank, factor_method, stats.moments, fisher)
    up_k, up_v = up[:n_key], up[n_key:]  # (D_n, r), (g*d_h, r)

    scale = math.sqrt(d_h + plan.d_rope) / math.sqrt(d_h)
    q_rows, kv_b_rows = [], []
    for h in range(n_h):
        j = h // group
        cols = slice(j * d_h, (j + 1) * d_h)
        q_h = q_aug[h * d_h : (h + 1) * d_h]  # (d_h, d+1)
        q_rows += [q_h * (scale * rope_scaling**2), (r_pe[:, cols] @ q_h) * scale]
        kv_b_rows += [r_nope[:, cols].T @ up_k, up_v[cols]]  # (d_h, r) each
    q_all = torch.cat(q_rows)  # (n_h*(d_h + d_rope), d+1)
    kv_a = torch.cat((down, r_pe @ k_aug))  # (r + d_rope, d+1)
    tensors = {
        "q_proj.weight": q_all[:, :-1],
        "kv_a_proj_with_mqa.weight": kv_a[:, :-1],
        "kv_b_proj.weight": torch.cat(kv_b_rows),  # (n_h*2*d_h, r)
        "o_proj.weight": attn.o_proj.weight.detach().to(torch.float64).cpu(),
    }
    if layout.qkv_bias:
        tensors["q_proj.bias"] = q_all[:, -1]
        tensors["kv_a_proj_with_mqa.bias"] = kv_a[:, -1]
    if attn.o_proj.bias is not None:
        tensors["o_proj.bias"] = attn.o_proj.bias.detach().to(torch.float64).cpu()
    return tensors, split.freq_index
