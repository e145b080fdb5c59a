"""Stage 2, calibrate: statistics of every attention layer on real text, one decoder layer at a time.

All statistics live in the K/V output space (``2 g d_h`` wide, never the ``d + 1`` wide input space), where every
later stage works: for ``y = [k; v] = [W_k; W_v] x + b`` (biases included) we keep ``C = E[y y^T]`` and, for the
queries, ``E[q^2]`` per query dimension.

With gradients, next-token cross-entropy (summed over tokens) is back-propagated to the key and value outputs and
we also keep, for each of ``k`` and ``v``, ``G = E[u u^T]`` with ``u = g / |g|`` (directions of the loss gradient
``g`` w.r.t. that output), ``C_g = E[|g|^2 y y^T]`` (output moments weighted per token by the gradient energy) and
the scalar ``E[|g|^2 |x~|^2]`` (``x~ = [x; 1]``, the trace of the input moments under the same weighting). Then
``tr(G dW S_g dW^T)`` estimates ``E[(g^T dW x~)^2]``: the (empirical Fisher) loss increase of an error ``dW``, in the
same units for every layer. Weighting tokens by their gradient matters: a few tokens (attention sinks) carry large
activations but need exact keys, and plain moments weight them like any other token.

The model is never run whole (``layerwise.LayerwiseModel``): a forward sweep pushes all calibration tokens through
one layer at a time and keeps only the layer-boundary hidden states (spilled to disk when large); a reverse sweep
recomputes each layer from its stored input and back-propagates the incoming gradient, which gives exactly the
gradients of a full backward pass. A layer's statistics are handed on (``on_layer``) as soon as they are complete.
Memory: one layer, the boundary states, and ``(2 g d_h)^2`` float64 numbers per statistic of the current layer.
"""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class LayerStats:
    """Calibration statistics of one attention layer (float64, CPU), in the K/V output space."""

    cov: torch.Tensor  # (2g*d_h, 2g*d_h)  E[y y^T], y = [k; v]
    q_energy: torch.Tensor  # (n_h*d_h,)  E[q^2]
    grad_k: torch.Tensor | None = None  # (g*d_h, g*d_h)  E[u u^T] of the key output's loss gradient
    grad_v: torch.Tensor | None = None  # (g*d_h, g*d_h)  same for the value output
    cov_k: torch.Tensor | None = None  # (2g*d_h, 2g*d_h)  E[|g_k|^2 y y^T]
    cov_v: torch.Tensor | None = None  # (2g*d_h, 2g*d_h)  E[|g_v|^2 y y^T]
    trace_k: float = 0.0  # E[|g_k|^2 |x~|^2]
    trace_v: float = 0.0  # E[|g_v|^2 |x~|^2]
    x_sample: torch.Tensor | None = None  # (M, d+1) float32: every n-th calibration input x~ (when asked for)
    w_k_sample: torch.Tensor | None = None  # (M,) |g_k|^2 of those tokens (with gradients)
    w_v_sample: torch.Tensor | None = None  # (M,) |g_v|^2

    @property
    def has_gradients(self) -> bool:
        return self.grad_k is not None

    @property
    def key_dim(self) -> int:
        return self.cov.shape[0] // 2


class _Accumulator:
    """Sums for one layer; ``finish`` divides by the token count."""

    def __init__(self, w_kv: torch.Tensor, gradients: bool, sample_every: int = 0):
        self.sample_every = sample_every  # keep every n-th token's input x~ (0: none)
        self.samples: dict[str, list] = {"x": [], "k": [], "v": []}
        self.picked: torch.Tensor | None = None  # rows of the current batch that are kept
        self.w_kv = w_kv  # (2g*d_h or g*d_h, d+1) float64 [W b] of k and v (of v alone with QK-norm), on the device
        self.gradients = gradients
        self.sums: dict[str, torch.Tensor | float] = {}
        self.tokens = 0
        self.y: torch.Tensor | None = None  # outputs of the current batch, kept for its backward pass
        self.x_norm2: torch.Tensor | None = None

    def _add(self, name: str, value) -> None:
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None = None) -> None:
        """``x`` the attention input, ``q`` the queries RoPE sees; ``k`` the normalized keys (QK-norm) or None."""
        d = x.shape[-1]
        xa = x.detach().reshape(-1, d).to(torch.float64)
        xa = torch.cat((xa, torch.ones_like(xa[:, :1])), dim=1)  # (N, d+1)
        y = xa @ self.w_kv.T  # (N, 2g*d_h), or (N, g*d_h) values only
        if k is not None:
            y = torch.cat((k.detach().reshape(xa.shape[0], -1).to(torch.float64), y), dim=1)
        self._add("cov", y.T @ y)
        self._add("q_energy", (q.detach().reshape(xa.shape[0], -1).to(torch.float64) ** 2).sum(0))
        if self.sample_every:
            rows = torch.arange(xa.shape[0], device=xa.device)
            self.picked = rows[(self.tokens + rows) % self.sample_every == 0]
            self.samples["x"].append(xa[self.picked].float().cpu())
        self.tokens += xa.shape[0]
        if self.gradients:
            self.y, self.x_norm2 = y, (xa**2).sum(1)

    def backward(self, name: str, grad: torch.Tensor) -> None:
        g = grad.reshape(-1, grad.shape[-1]).to(torch.float64)  # (N, g*d_h)
        norm2 = (g**2).sum(1)  # (N,)
        unit = g / norm2.clamp_min(1e-30).sqrt()[:, None]
        self._add(f"grad_{name}", unit.T @ unit)
        self._add(f"cov_{name}", (self.y * norm2[:, None]).T @ self.y)
        self._add(f"trace_{name}", float((norm2 * self.x_norm2).sum()))
        if self.sample_every:
            self.samples[name].append(norm2[self.picked].float().cpu())

    def finish(self) -> LayerStats:
        n = max(self.tokens, 1)
        stats = LayerStats(**{k: (v / n).cpu() if torch.is_tensor(v) else v / n for k, v in self.sums.items()})
        if self.sample_every:
            stats.x_sample = torch.cat(self.samples["x"])
            if self.samples["k"]:
                stats.w_k_sample, stats.w_v_sample = torch.cat(self.samples["k"]), torch.cat(self.samples["v"])
        return stats


def _taps(attn, layout) -> dict:
    """Where the source computes what the statistics need: ``name: (module, row slice or None)`` of q (as RoPE sees
    it), k (the keys that are cached: normalized with QK-norm) and v."""
    if layout.fused_qkv:
        fused = getattr(attn, layout.fused_qkv)
        return {name: (fused, sl) for name, sl in layout.qkv_slices().items()}
    if layout.qk_norm:
        return {"q": (attn.q_norm, None), "k": (attn.k_norm, None), "v": (attn.v_proj, None)}
    return {"q": (attn.q_proj, None), "k": (attn.k_proj, None), "v": (attn.v_proj, None)}


def _tokens_last(t: torch.Tensor, layout, sl) -> torch.Tensor:
    """A tap's output (or its gradient) as (B*T, width)."""
    if layout.qk_norm_transposed and t.dim() == 4:  # (B, H, T, d_h) -> (B, T, H, d_h)
        t = t.transpose(1, 2)
    t = t.reshape(t.shape[0] * t.shape[1], -1)
    return t[:, sl] if sl is not None else t


def _hooks(attn, acc: _Accumulator, layout) -> list:
    """Capture the attention input and q (and k with QK-norm) and, with gradients, the k/v output gradients."""
    seen = {}
    taps = _taps(attn, layout)
    want = ["q", "k"] if layout.qk_norm else ["q"]

    def pre_hook(module, args, kwargs):
        seen["x"] = kwargs.get("hidden_states", args[0] if args else None)

    def done_hook(module, args, output):
        acc.forward(seen.pop("x"), seen.pop("q"), seen.pop("k", None))

    handles = [attn.register_forward_pre_hook(pre_hook, with_kwargs=True), attn.register_forward_hook(done_hook)]
    modules = {}
    for name, (module, sl) in taps.items():
        modules.setdefault(id(module), (module, []))[1].append((name, sl))
    for module, named in modules.values():
        def out_hook(mod, args, output, named=named):
            for name, sl in named:
                if name in want:
                    seen[name] = _tokens_last(output.detach(), layout, sl)
            if acc.gradients and output.requires_grad:
                def grad_hook(grad, named=named):
                    for name, sl in named:
                        if name in ("k", "v"):
                            acc.backward(name, _tokens_last(grad, layout, sl))
                output.register_hook(grad_hook)

        handles.append(module.register_forward_hook(out_hook))
    return handles


def _w_kv(attn, layout, device) -> torch.Tensor:
    """``[W b]`` (float64) of the projections whose outputs are linear in the input: k and v, or v alone when the
    keys are normalized (QK-norm)."""
    taps = _taps(attn, layout)
    rows = []
    for proj, sl in [taps["v"]] if layout.qk_norm else [taps["k"], taps["v"]]:
        sl = sl if sl is not None else slice(None)
        w = proj.weight.detach()[sl].to(device, torch.float64)
        b = (proj.bias.detach()[sl].to(device, torch.float64) if proj.bias is not None
             else torch.zeros(w.shape[0], dtype=torch.float64, device=device))
        rows.append(torch.cat((w, b[:, None]), dim=1))
    return torch.cat(rows)  # (2g*d_h or g*d_h, d+1)


def sweep(lw, layout, windows: torch.Tensor, batch_size: int, gradients: bool, on_layer, store, extra=None,
          desc: str = "calibrate", samples: int = 0):
    """Run ``lw`` (a ``LayerwiseModel`` of a source with ``layout``) over ``windows`` (N, T) layer by layer; call
    ``on_layer(i, stats)`` for each layer as its statistics complete (layer order without gradients, reverse order
    with them).

    ``store`` (a ``layerwise.Spill``) keeps the boundary hidden states. ``extra`` (M, T') are more windows pushed
    through the source alongside (no statistics): their final hidden states are returned (the verification reference).
    ``samples``: also keep about this many tokens' attention inputs per layer (``LayerStats.x_sample``).
    """
    every = -(-windows.numel() // samples) if samples else 0
    batches = [windows[s : s + batch_size] for s in range(0, len(windows), batch_size)]
    n = lw.num_layers
    with torch.no_grad():
        states = list(lw.embed(windows).split(batch_size))  # one read of the embedding table
        extra_h = lw.embed(extra) if extra is not None else None
    for i in tqdm(range(n), desc=f"{desc}: forward", unit="layer"):
        if gradients:  # statistics come in the reverse sweep, which recomputes this layer from its input
            store.put(f"h{i}", torch.cat(states))
        attn = lw.load(i).self_attn
        acc = None if gradients else _Accumulator(_w_kv(attn, layout, lw.device), gradients=False, sample_every=every)
        handles = _hooks(attn, acc, layout) if acc is not None else []
        try:
            with torch.no_grad():
                states = [lw.run(i, h) for h in states]
        finally:
            for h in handles:
                h.remove()
        if extra_h is not None:  # no statistics from these windows
            with torch.no_grad():
                extra_h = lw.run(i, extra_h)
        lw.release(i)
        if acc is not None:
            on_layer(i, acc.finish())
    if not gradients:
        return extra_h
    grads = [lw.head_gradient(h, b) for h, b in zip(states, batches)]  # dLoss/dh_n per batch
    del states
    for i in tqdm(reversed(range(n)), total=n, desc=f"{desc}: backward", unit="layer"):
        inputs = store.pop(f"h{i}").split(batch_size)
        attn = lw.load(i).self_attn
        acc = _Accumulator(_w_kv(attn, layout, lw.device), gradients=True, sample_every=every)
        handles = _hooks(attn, acc, layout)
        try:
            for b, h in enumerate(inputs):
                h = h.to(lw.device).requires_grad_(True)
                with torch.enable_grad():
                    out = lw.run(i, h)
                    torch.autograd.backward(out, grads[b])
                grads[b] = h.grad.detach()
        finally:
            for h in handles:
                h.remove()
            lw.release(i)
        on_layer(i, acc.finish())
    return extra_h
