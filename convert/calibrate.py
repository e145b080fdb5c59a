"""Stage 2, calibrate: statistics of every attention layer on real text.

For each layer we accumulate ``S = E[x~ x~^T]`` with ``x~ = [x; 1]`` the normed hidden state entering attention,
augmented with a constant 1 so that biases are handled exactly. Every statistic the later stages need (key, value,
query covariances) is a quadratic form of S: for a projection ``y = W x + b``, ``E[y y^T] = [W b] S [W b]^T``.

With ``gradients=True`` one backward pass of next-token cross-entropy also gives, for the key and value projections,
``G = E[g g^T / |g|^2]`` (directions of the loss gradient ``g`` w.r.t. the projection's output) and
``S_g = E[|g|^2 x~ x~^T]`` (input moments weighted per token by the gradient energy). Then
``tr(G dW S_g dW^T)`` estimates ``E[(g^T dW x~)^2]``: the (empirical Fisher) loss increase of an error ``dW``, in
the same units for every layer. Weighting tokens by their gradient matters: a few tokens (attention sinks) carry
large activations but need exact keys, and plain moments weight them like any other token.
Memory: a few ``(d+1) x (d+1)`` float64 matrices per layer, independent of the amount of text.
"""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class LayerStats:
    moments: torch.Tensor  # (d+1, d+1)  E[x~ x~^T]
    grad_k: torch.Tensor | None = None  # (g*d_h, g*d_h)  E[g g^T/|g|^2] of the key output
    grad_v: torch.Tensor | None = None  # (g*d_h, g*d_h)  same for the value output
    moments_k: torch.Tensor | None = None  # (d+1, d+1)  E[|g_k|^2 x~ x~^T]
    moments_v: torch.Tensor | None = None  # (d+1, d+1)  E[|g_v|^2 x~ x~^T]

    @property
    def has_gradients(self) -> bool:
        return self.grad_k is not None


def attention_modules(model) -> list:
    return [layer.self_attn for layer in model.model.layers]


def _augment(x: torch.Tensor, d: int) -> torch.Tensor:
    x = x.detach().reshape(-1, d).to(torch.float64).cpu()
    return torch.cat((x, torch.ones(x.shape[0], 1, dtype=x.dtype)), dim=1)  # (N, d+1)


def collect_statistics(model, windows: torch.Tensor, batch_size: int = 4, gradients: bool = True,
                       desc: str = "calibrate") -> list[LayerStats]:
    """Run ``model`` over ``windows`` (N, T) and return the per-layer statistics (float64, on CPU)."""
    attn = attention_modules(model)
    d = model.config.hidden_size
    acc = [{"moments": 0, "grad_k": 0, "grad_v": 0, "moments_k": 0, "moments_v": 0} for _ in attn]
    inputs: dict[int, torch.Tensor] = {}
    tokens = [0]

    def pre_hook(i):
        def hook(module, args, kwargs):
            xa = _augment(kwargs.get("hidden_states", args[0] if args else None), d)
            acc[i]["moments"] = acc[i]["moments"] + xa.T @ xa
            if gradients:  # kept until the backward pass weights it by the gradient
                inputs[i] = xa
            if i == 0:
                tokens[0] += xa.shape[0]

        return hook

    def out_hook(i, name):
        def forward_hook(module, args, output):
            def grad_hook(grad):
                g = grad.reshape(-1, grad.shape[-1]).to(torch.float64).cpu()  # (N, g*d_h)
                norm2 = (g**2).sum(1, keepdim=True)  # (N, 1)
                unit = g / norm2.clamp_min(1e-30).sqrt()
                acc[i][f"grad_{name}"] = acc[i][f"grad_{name}"] + unit.T @ unit
                acc[i][f"moments_{name}"] = acc[i][f"moments_{name}"] + (inputs[i] * norm2).T @ inputs[i]

            if output.requires_grad:
                output.register_hook(grad_hook)

        return forward_hook

    handles = [m.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, m in enumerate(attn)]
    if gradients:
        for i, m in enumerate(attn):
            handles += [m.k_proj.register_forward_hook(out_hook(i, "k")), m.v_proj.register_forward_hook(out_hook(i, "v"))]
    device = next(model.parameters()).device
    flags = [p.requires_grad for p in model.parameters()]
    embed = model.get_input_embeddings()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch"):
            batch = windows[start : start + batch_size].to(device)
            if not gradients:
                with torch.no_grad():
                    model.model(input_ids=batch, use_cache=False)
                continue
            with torch.enable_grad():
                emb = embed(batch).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         batch[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
            inputs.clear()
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    n = max(tokens[0], 1)
    if not gradients:
        return [LayerStats(moments=a["moments"] / n) for a in acc]
    return [LayerStats(**{k: v / n for k, v in a.items()}) for a in acc]
