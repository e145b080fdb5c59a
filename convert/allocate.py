"""Rank allocation and the one-way flow of per-layer results: statistics -> plan -> layer tensors -> sink.

The budget ``F`` gives ``round(F * 2 g d_h)`` cached values per token per layer on average; ``rope_share`` of them
go to the decoupled RoPE key, the rest to the latent. With ``rank_alloc = "fisher"`` the totals are shared out
across layers by measured sensitivity instead of evenly:
1. RoPE: every rotated key component of every layer is scored by the loss it would cost without RoPE
   (``ropesplit``, method ``rotate``); the best-scoring components over all layers keep RoPE.
2. Latent: every layer's Fisher eigenvalues (``factorize``) are the estimated loss of dropping each latent
   direction; the largest over all layers are kept (at least ``MIN_RANK`` per layer).
Both scores estimate the same quantity (nats of loss), so layers that matter get more and the total is exact.

``LayerConverter`` takes each layer's statistics as calibration completes it. With fixed plans (uniform ranks,
explicit ranks, lossless) the layer is converted at once. With ``fisher`` allocation it keeps only small summaries
(RoPE component scores, eigenvalues) in memory and the rest in a ``layerwise.Spill``; every RoPE split and
eigendecomposition is computed once and passed forward to the layer's tensors.
"""

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .adapters import Layout
from .assemble import LayerPlan, assemble, decompose, read_attention, rope_scores
from .calibrate import sweep
from .deepseek import check_layout, strides as deepseek_strides
from .errors import MLAError
from .layerwise import Spill, run_layers
from .ropesplit import strided_pairs

MIN_RANK = 4
# llama.cpp on CPUs with AMX puts a float16 weight whose rows are a multiple of 16 into AMX buffers; its deepseek2
# graph with flash attention then multiplies attn_v_b (rows: kv_lora_rank) by a tensor those buffers cannot take and
# aborts when the context is created. A budget's deepseek_v3 split avoids such ranks when it can.
AMX_BLOCK = 16
DEFAULT_BUDGET = 0.3125  # --kv-budget when neither it nor explicit ranks are given


def budget_totals(layout: Layout, cfg, budget: float) -> tuple[int, int]:
    """``(values, d_rope)`` per token per layer on average for ``budget``; MLAError when impossible."""
    kv_dim = layout.num_kv_heads * layout.head_dim
    total = round(budget * 2 * kv_dim)
    d_rope = min(kv_dim, 2 * round(cfg.rope_share * total / 2))
    if total - d_rope < 1:
        raise MLAError(f"--kv-budget {budget} leaves no room for a latent ({total} values per token per layer)")
    return total, d_rope


def uniform_plans(layout: Layout, rank: int, d_rope: int) -> list[LayerPlan]:
    """``rank`` + ``d_rope`` per layer; a layer that can keep fewer RoPE values (partial rotary, no RoPE) gives the
    rest to its latent."""
    kv_dim = layout.num_kv_heads * layout.head_dim
    if d_rope > kv_dim:
        raise MLAError(f"--rope-dim {d_rope} is impossible: at most num_key_value_heads*head_dim = {kv_dim}")
    if rank > 2 * kv_dim - d_rope:
        raise MLAError(f"--kv-lora-rank {rank} is impossible: at most {2 * kv_dim - d_rope} with rope dim {d_rope} for this model")
    plans = []
    for i in range(layout.num_layers):
        keep = min(d_rope, layout.rope_capacity(i))
        plans.append(LayerPlan(rank=rank + d_rope - keep, d_rope=keep))
    return plans


def lossless_plans(layout: Layout) -> list[LayerPlan]:
    """Every RoPE pair kept, everything else (the values, the never-rotated key dims) in the latent: exact."""
    kv_dim = layout.num_kv_heads * layout.head_dim
    return [LayerPlan(rank=2 * kv_dim - layout.rope_capacity(i), d_rope=layout.rope_capacity(i))
            for i in range(layout.num_layers)]


def allocate_ropes(scores: list[torch.Tensor], d_rope: int) -> list[int]:
    """RoPE width per layer: the ``n * d_rope / 2`` best-scoring rotated components over all layers keep RoPE."""
    n = len(scores)
    scored = sorted(((float(s), i) for i, sc in enumerate(scores) for s in sc.flatten()), key=lambda t: t[0],
                    reverse=True)
    ropes = [0] * n
    for _, i in scored[: n * d_rope // 2]:
        ropes[i] += 2
    return ropes


def allocate_ranks(spectra: list[torch.Tensor], ropes: list[int], total: int, floor: int) -> list[int]:
    """Latent width per layer: ``floor`` each, then the largest remaining eigenvalues over all layers."""
    n = len(spectra)
    candidates = sorted(((float(v), i) for i, sp in enumerate(spectra) for v in sp[floor:]), key=lambda t: t[0],
                        reverse=True)
    extra = n * total - sum(ropes) - floor * n
    if extra > len(candidates):
        raise MLAError("the KV budget exceeds what the layers can hold")
    ranks = [floor] * n
    for _, i in candidates[:extra]:
        ranks[i] += 1
    return ranks


@dataclass
class Strided:
    """The DeepSeek-V3 format's constraints on a conversion (``deepseek.check_layout``): one latent rank and one RoPE
    width ``r`` for all layers, the RoPE frequencies ``0, c, 2c, ...`` (one rotated component each, ``c`` the same in
    every layer, every one in ``eligible``) and a normalised latent. ``total``: cached values per token per layer;
    ``ropes``: the RoPE widths to choose from (the one with the lowest estimated loss wins)."""

    total: int
    ropes: list[int]
    eligible: set[int]


class LayerConverter:
    """Turns per-layer statistics into MLA attention tensors, handed to ``sink(i, tensors, freq_index)``.

    ``plans``: the final plans when they need no calibration (else None: fisher allocation from ``total, d_rope``).
    ``reader``: where the source attention weights are read (``layerwise.TensorReader``); ``store``: a Spill.
    """

    def __init__(self, layout: Layout, cfg, plans, reader, sink, store, totals: tuple[int, int] | None = None,
                 lossless: bool = False, strided: Strided | None = None):
        self.layout, self.cfg, self.plans, self.reader, self.sink, self.store = layout, cfg, plans, reader, sink, store
        self.totals = totals
        self.strided = strided
        self.norm_fits: dict[int, dict] = {}
        self.search: list[dict] = []
        self.rope_method, self.factor_method = ("high", "pca") if lossless else (cfg.rope_method, cfg.factor_method)
        self.scored: dict[int, tuple] = {}
        self.freq_index: dict[int, list[int]] = {}
        self.seconds: dict[str, float] = {"rope": 0.0, "decompose": 0.0, "assemble": 0.0}

    def _emit(self, i: int, w, dec, rank: int, stats=None) -> None:
        t0 = time.perf_counter()
        samples, report = None, None
        if self.strided is not None:  # the latent norm, fitted on the layer's calibration tokens
            fisher = self.factor_method == "fisher"
            samples = (stats.x_sample, stats.w_k_sample if fisher else None, stats.w_v_sample if fisher else None)
            report = self.norm_fits.setdefault(i, {})
        tensors = assemble(w, dec, self.layout, rank, self.layout.layer_frequencies(i)[1],
                           self.layout.layer_rotary_dim(i), samples, report)
        self.seconds["assemble"] += time.perf_counter() - t0
        self.freq_index[i] = dec.split.freq_index
        self.sink(i, tensors, dec.split.freq_index)

    def _decompose(self, i, w, stats, d_rope, method, scored=None, spectrum=False, stride=None):
        t0 = time.perf_counter()
        dec = decompose(w, stats, self.layout, i, d_rope, self.rope_method, method, self.cfg.rope_span, scored,
                        spectrum, stride)
        self.seconds["decompose"] += time.perf_counter() - t0
        return dec

    def add(self, i: int, stats) -> None:
        """Layer ``i``'s statistics are complete (None when the conversion needs none)."""
        w = read_attention(self.reader, i, self.layout)
        if self.plans is not None:
            plan = self.plans[i]
            self._emit(i, w, self._decompose(i, w, stats, plan.d_rope, self.factor_method), plan.rank)
            return
        if self.rope_method == "rotate" or self.strided is not None:
            t0 = time.perf_counter()
            self.scored[i] = rope_scores(stats, self.layout, i, self.rope_method, self.cfg.rope_span)
            self.seconds["rope"] += time.perf_counter() - t0
        self.store.put(f"stats{i}", stats)

    def finish(self) -> tuple[list[LayerPlan], list[list[int]]]:
        """Allocate (when needed), convert the layers not yet converted; return (plans, freq_index per layer)."""
        n = self.layout.num_layers
        if self.strided is not None:
            self._finish_strided()
        elif self.plans is None:
            total, d_rope = self.totals
            # scores of unrotated selections are per head and not comparable across layers
            ropes = allocate_ropes([self.scored[i][1] for i in range(n)], d_rope) if self.rope_method == "rotate" \
                else [min(d_rope, self.layout.rope_capacity(i)) for i in range(n)]
            floor = min(MIN_RANK, total - d_rope)
            spectra, reuse = [], self.factor_method == "fisher"
            for i in tqdm(range(n), desc="allocate ranks", unit="layer"):
                w = read_attention(self.reader, i, self.layout)
                stats = self.store.get(f"stats{i}")
                dec = self._decompose(i, w, stats, ropes[i], "fisher", self.scored.get(i), spectrum=True)
                spectra.append(dec.spectrum[0])
                if reuse:
                    self.store.pop(f"stats{i}")
                    self.store.put(f"dec{i}", dec)
                del dec, stats
            ranks = allocate_ranks(spectra, ropes, total, floor)
            self.plans = [LayerPlan(rank=r, d_rope=d) for r, d in zip(ranks, ropes)]
            for i in tqdm(range(n), desc="convert layers", unit="layer"):
                w = read_attention(self.reader, i, self.layout)
                if reuse:
                    dec = self.store.pop(f"dec{i}")
                else:
                    dec = self._decompose(i, w, self.store.pop(f"stats{i}"), ropes[i], self.factor_method,
                                          self.scored.get(i))
                self._emit(i, w, dec, ranks[i])
        missing = [i for i in range(n) if i not in self.freq_index]
        if missing:
            raise MLAError(f"internal error: layer {missing[0]} was never converted")
        return self.plans, [self.freq_index[i] for i in range(n)]

    def _finish_strided(self) -> None:
        """Choose ``(r, c)`` for all layers, then convert every layer with rank ``total - r`` and a normalised latent.

        For each RoPE width the stride whose kept components score highest over all layers; with several widths, the
        estimated loss of each (the RoPE scores of the components that lose RoPE plus the Fisher eigenvalues the latent
        drops, both in nats: ``allocate``'s fisher allocation) picks one."""
        n, half = self.layout.num_layers, self.layout.rotary_dim // 2
        plan = self.strided
        scores = [self.scored[i][1] for i in range(n)]  # (half, g) per layer
        options = []
        for r in plan.ropes:
            cs = deepseek_strides(plan.eligible, half, r // 2)
            if not cs or not 1 <= plan.total - r:
                continue
            kept = {c: sum(float(sc[i, k]) for sc in scores for i, k in strided_pairs(sc, c, r // 2)) for c in cs}
            c = max(cs, key=lambda c: (kept[c], -c))
            options.append({"qk_rope_head_dim": r, "rope_stride": c, "kv_lora_rank": plan.total - r,
                            "rope_loss": sum(float(sc.sum()) for sc in scores) - kept[c]})
        if not options:
            raise MLAError(f"no RoPE width in {plan.ropes} fits the deepseek_v3 format's frequencies for this model")
        if len(options) > 1:
            for opt in options:
                opt["latent_loss"] = 0.0
            for i in tqdm(range(n), desc="choose rank / RoPE split", unit="layer"):
                w, stats = read_attention(self.reader, i, self.layout), self.store.get(f"stats{i}")
                for opt in options:
                    dec = self._decompose(i, w, stats, opt["qk_rope_head_dim"], "fisher", self.scored[i],
                                          spectrum=True, stride=opt["rope_stride"])
                    opt["latent_loss"] += float(dec.spectrum[0][opt["kv_lora_rank"]:].sum())
                del stats
            for opt in options:
                opt["estimated_loss"] = opt["rope_loss"] + opt["latent_loss"]
            self.search = options
        best = min(options, key=lambda o: o.get("estimated_loss", 0.0))
        stride, r, rank = best["rope_stride"], best["qk_rope_head_dim"], best["kv_lora_rank"]
        self.plans = [LayerPlan(rank=rank, d_rope=r) for _ in range(n)]
        for i in tqdm(range(n), desc="convert layers", unit="layer"):
            w = read_attention(self.reader, i, self.layout)
            stats = self.store.pop(f"stats{i}")
            dec = self._decompose(i, w, stats, r, self.factor_method, self.scored[i], stride=stride)
            self._emit(i, w, dec, rank, stats)



def requested_budget(cfg) -> float | None:
    """The budget asked for: --kv-budget, else the default unless explicit ranks were given."""
    if cfg.kv_budget is not None:
        return cfg.kv_budget
    return None if cfg.kv_lora_rank is not None or cfg.rope_dim is not None else DEFAULT_BUDGET


def check_plan(layout: Layout, cfg) -> list[LayerPlan] | None:
    """Validate the requested ranks before any work: the final uniform plans, or None when they need calibration."""
    kv_dim = layout.num_kv_heads * layout.head_dim
    if cfg.kv_lora_rank is not None or cfg.rope_dim is not None:
        if cfg.kv_lora_rank is None or cfg.rope_dim is None:
            raise MLAError("give both --kv-lora-rank and --rope-dim (or --kv-budget)")
        return uniform_plans(layout, cfg.kv_lora_rank, cfg.rope_dim)
    budget = requested_budget(cfg)
    if round(budget * 2 * kv_dim) >= 2 * kv_dim:
        return lossless_plans(layout)  # all of RoPE kept, the latent is V (and any never-rotated key dims)
    total, d_rope = budget_totals(layout, cfg, budget)
    return uniform_plans(layout, total - d_rope, d_rope) if cfg.rank_alloc == "uniform" else None


def strided_plan(layout: Layout, cfg, eligible: set[int]) -> Strided:
    """The deepseek_v3 format's plan: cached values per layer and the RoPE widths to choose from (explicit ranks:
    exactly those; with rotate + fisher, every multiple of 8 up to ``head_dim``, chosen by estimated loss; otherwise
    ``rope_share`` of the budget)."""
    if cfg.kv_lora_rank is not None:  # check_plan validated them
        if not 2 <= cfg.rope_dim <= layout.rotary_dim:
            raise MLAError(f"--format deepseek_v3 needs --rope-dim between 2 and head_dim {layout.rotary_dim}")
        return Strided(cfg.kv_lora_rank + cfg.rope_dim, [cfg.rope_dim], eligible)
    budget = requested_budget(cfg)
    total = round(budget * 2 * layout.kv_dim)
    if total < 3:
        raise MLAError(f"--kv-budget {budget} leaves no room for a latent and a RoPE key ({total} values per token "
                       "per layer)")
    aligned = block_widths(total, layout.rotary_dim, cfg.width_block)
    if aligned is not None:
        total, ropes = aligned
        if not (cfg.rope_method == "rotate" and cfg.factor_method == "fisher"):  # one width: the share's nearest
            ropes = [min(ropes, key=lambda r: abs(r - cfg.rope_share * total))]
        return Strided(total, ropes, eligible)
    top = min(layout.rotary_dim, total - MIN_RANK)
    ropes = list(range(8, top + 1, 8)) if cfg.rope_method == "rotate" and cfg.factor_method == "fisher" else []
    ropes = [r for r in ropes if (total - r) % AMX_BLOCK] or ropes  # see AMX_BLOCK
    if not ropes:
        share = 2 * round(cfg.rope_share * total / 2)
        ropes = [max(2, min(share, layout.rotary_dim, 2 * ((total - 1) // 2)))]
    return Strided(total, ropes, eligible)


def block_widths(total: int, rotary_dim: int, block: int) -> tuple[int, list[int]] | None:
    """``(cached width, RoPE widths)`` for ``--width-block``: the width rounded down to a multiple of ``block`` and
    every RoPE width (up to ``rotary_dim``) at an odd multiple of ``block / 2``, so the latent's width is one too;
    None when ``block`` is 0 or no such split leaves the latent ``MIN_RANK`` values."""
    if not block:
        return None
    width = total // block * block
    ropes = [r for r in range(block // 2, min(rotary_dim, width - MIN_RANK) + 1, block)]
    return (width, ropes) if ropes else None


def is_lossless(layout: Layout, plans: list[LayerPlan] | None) -> bool:
    return plans is not None and plans == lossless_plans(layout)


def needs_gradients(layout: Layout, cfg, plans: list[LayerPlan] | None) -> bool:
    if is_lossless(layout, plans):
        return False
    return plans is None or cfg.rope_method == "rotate" or cfg.factor_method == "fisher"


def needs_statistics(layout: Layout, cfg, plans: list[LayerPlan] | None) -> bool:
    return not is_lossless(layout, plans)


def layer_converter(layout: Layout, cfg, plans, reader, sink, store, strided: Strided | None = None):
    """The LayerConverter for ``cfg`` (plans None: fisher allocation under the budget's totals, or the deepseek_v3
    format's ``strided`` plan)."""
    if strided is not None:
        return LayerConverter(layout, cfg, None, reader, sink, store, strided=strided)
    totals = None if plans is not None else budget_totals(layout, cfg, requested_budget(cfg))
    return LayerConverter(layout, cfg, plans, reader, sink, store, totals, is_lossless(layout, plans))


def plan(layout: Layout, cfg) -> tuple[list[LayerPlan] | None, Strided | None]:
    """Before any work: ``(plans, None)`` for ``--format mla`` (plans None: chosen after calibration) or ``(None,
    strided plan)`` for ``--format deepseek_v3``; the ranks / budget are validated in every format."""
    plans = check_plan(layout, cfg)
    if cfg.format == "deepseek_v3":
        return None, strided_plan(layout, cfg, check_layout(layout, cfg))
    return plans, None


def convert_layers(lw, layout: Layout, cfg, plans, strided, calib, verify, sink, store: Spill, clock,
                   samples: int = 0):
    """Calibrate ``lw`` (a ``LayerwiseModel``) on ``calib`` and convert every layer into ``sink`` (closed at the
    end); return ``(plans, freq_index, the final hidden states of ``verify`` through the source, the
    LayerConverter)``. ``store`` keeps what does not fit in memory and is emptied at the end; ``clock`` times the
    stages ``calibrate`` and ``convert``; ``samples``: attention inputs kept per layer (deepseek_v3's latent norm)."""
    try:
        converter = layer_converter(layout, cfg, plans, lw.reader, sink, store, strided)
        if needs_statistics(layout, cfg, plans):
            ref_h = sweep(lw, layout, calib, cfg.batch_size, needs_gradients(layout, cfg, plans), converter.add,
                          store, extra=verify, samples=samples)
        else:
            ref_h = run_layers(lw, verify, "reference")
            for i in range(layout.num_layers):
                converter.add(i, None)
        clock.lap("calibrate")
        plans, freq_index = converter.finish()
        sink.close()
        clock.lap("convert")
    finally:
        store.close()
    return plans, freq_index, ref_h, converter
