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

from .factorize import joint_latent
from .ropesplit import rope_split


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


def convert_layer(attn, moments, layout, plan: LayerPlan, rope_method: str, factor_method: str, rope_scaling: float = 1.0):
    """Return ``(tensors, freq_index)``: the new attention tensors (float64, names relative to ``self_attn``)."""
    g, d_h, n_h = layout.num_kv_heads, layout.head_dim, layout.num_heads
    group = n_h // g
    q_aug, k_aug, v_aug = augmented(attn.q_proj), augmented(attn.k_proj), augmented(attn.v_proj)
    split = rope_split(k_aug, q_aug, moments, g, d_h, plan.d_rope, rope_method)
    r_pe, r_nope = split.rotation[: plan.d_rope], split.rotation[plan.d_rope :]  # (d_rope, g*d_h), (D_n, g*d_h)
    n_key = r_nope.shape[0]
    z_aug = torch.cat((r_nope @ k_aug, v_aug), dim=0)  # (D_n + g*d_h, d+1)
    down, up = joint_latent(z_aug, moments, n_key, plan.rank, factor_method)
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
