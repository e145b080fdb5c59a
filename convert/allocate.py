"""Rank allocation: share one KV budget between the layers' latent widths and RoPE widths.

The budget ``F`` gives ``round(F * 2 g d_h)`` cached values per token per layer on average; ``rope_share`` of them
go to the decoupled RoPE key, the rest to the latent. With ``rank_alloc = "fisher"`` the totals are shared out
across layers by measured sensitivity instead of evenly:
1. RoPE: every rotated key component of every layer is scored by the loss it would cost without RoPE
   (``ropesplit``, method ``rotate``); the best-scoring components over all layers keep RoPE.
2. Latent: every layer's Fisher eigenvalues (``factorize``) are the estimated loss of dropping each latent
   direction; the largest over all layers are kept (at least ``MIN_RANK`` per layer).
Both scores estimate the same quantity (nats of loss), so layers that matter get more and the total is exact.
"""

from tqdm.auto import tqdm

from .adapters import Layout
from .assemble import LayerPlan, layer_spectrum, rope_scores
from .errors import MLAError

MIN_RANK = 4


def budget_totals(layout: Layout, cfg, budget: float) -> tuple[int, int]:
    """``(values, d_rope)`` per token per layer on average for ``budget``; MLAError when impossible."""
    kv_dim = layout.num_kv_heads * layout.head_dim
    total = round(budget * 2 * kv_dim)
    d_rope = min(kv_dim, 2 * round(cfg.rope_share * total / 2))
    if total - d_rope < 1:
        raise MLAError(f"--kv-budget {budget} leaves no room for a latent ({total} values per token per layer)")
    return total, d_rope


def uniform_plans(layout: Layout, rank: int, d_rope: int) -> list[LayerPlan]:
    kv_dim = layout.num_kv_heads * layout.head_dim
    if d_rope > kv_dim:
        raise MLAError(f"--rope-dim {d_rope} is impossible: at most num_key_value_heads*head_dim = {kv_dim}")
    if rank > 2 * kv_dim - d_rope:
        raise MLAError(f"--kv-lora-rank {rank} is impossible: at most {2 * kv_dim - d_rope} with rope dim {d_rope} for this model")
    return [LayerPlan(rank=rank, d_rope=d_rope) for _ in range(layout.num_layers)]


def allocate(attns, stats, layout: Layout, total: int, d_rope: int, rope_method: str, span: int) -> list[LayerPlan]:
    """Per-layer plans with ``sum(rank + d_rope) == total * num_layers`` from the calibration statistics."""
    n = layout.num_layers
    if rope_method == "rotate":
        scored = []
        for i, attn in enumerate(tqdm(attns, desc="score RoPE", unit="layer")):
            scored += [(float(s), i) for s in rope_scores(attn, stats[i], layout, rope_method, span).flatten()]
        scored.sort(key=lambda t: t[0], reverse=True)
        ropes = [0] * n
        for _, i in scored[: n * d_rope // 2]:
            ropes[i] += 2
    else:  # scores of unrotated selections are per head and not comparable across layers
        ropes = [d_rope] * n
    floor = min(MIN_RANK, total - d_rope)
    ranks = [floor] * n
    candidates = []
    for i, attn in enumerate(tqdm(attns, desc="allocate ranks", unit="layer")):
        spectrum = layer_spectrum(attn, stats[i], layout, ropes[i], rope_method, span)
        candidates += [(float(v), i) for v in spectrum[floor:]]
    candidates.sort(key=lambda t: t[0], reverse=True)
    extra = n * total - sum(ropes) - floor * n
    if extra > len(candidates):
        raise MLAError("the KV budget exceeds what the layers can hold")
    for _, i in candidates[:extra]:
        ranks[i] += 1
    return [LayerPlan(rank=r, d_rope=d) for r, d in zip(ranks, ropes)]
