"""Stage 2, calibrate: second moments of every attention layer's input on real text.

For each layer we accumulate ``S = E[x~ x~^T]`` with ``x~ = [x; 1]`` the normed hidden state entering attention,
augmented with a constant 1 so that biases are handled exactly. Every statistic the later stages need (key, value,
query covariances) is a quadratic form of S: for a projection ``y = W x + b``, ``E[y y^T] = [W b] S [W b]^T``.
Memory: one ``(d+1) x (d+1)`` float64 matrix per layer, independent of the amount of text.
"""

import torch
from tqdm.auto import tqdm


def attention_modules(model) -> list:
    return [layer.self_attn for layer in model.model.layers]


@torch.no_grad()
def collect_input_moments(model, windows: torch.Tensor, batch_size: int = 4, desc: str = "calibrate") -> list[torch.Tensor]:
    """Run ``model`` over ``windows`` (N, T) and return, per layer, ``E[x~ x~^T]`` as a float64 (d+1, d+1) tensor."""
    attn = attention_modules(model)
    d = model.config.hidden_size
    moments = [torch.zeros(d + 1, d + 1, dtype=torch.float64) for _ in attn]
    count = [0]

    def make_hook(i):
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)  # (B, T, d)
            x = x.reshape(-1, d).to(torch.float32)
            xa = torch.cat((x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)), dim=1)  # (N, d+1)
            moments[i] += (xa.T @ xa).to(torch.float64).cpu()
            if i == 0:
                count[0] += x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(attn)]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch"):
            batch = windows[start : start + batch_size].to(device)
            model.model(input_ids=batch, use_cache=False)  # the base model: no need for logits
    finally:
        for h in handles:
            h.remove()
    return [m / max(count[0], 1) for m in moments]
