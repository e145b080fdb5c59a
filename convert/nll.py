"""The held-out measure: mean next-token negative log-likelihood of a model on independent token windows.

Recovery validates with it (``convert.recover``); ``eval.perplexity`` reports it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import MLAError


def window_nll(model, windows: torch.LongTensor, batch_size: int = 4, desc: str = "ppl") -> torch.Tensor:
    """Mean NLL of tokens 1..T-1 of every window given its own prefix (windows are independent): ``(n,)``."""
    return token_nll(model, windows, batch_size, desc).mean(1).double()


def token_nll(model, windows: torch.LongTensor, batch_size: int = 4, desc: str = "ppl") -> torch.Tensor:
    """NLL of each of tokens 1..T-1 of every window given its own prefix: ``(n, T-1)`` float32 on the CPU."""
    if windows.shape[-1] < 2:
        raise MLAError("perplexity needs windows of at least 2 tokens")
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch"):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
            out.append(F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").cpu())  # (B, T-1)
    return torch.cat(out)


def perplexity(model, windows: torch.LongTensor, batch_size: int = 4, desc: str = "ppl") -> float:
    """exp(mean NLL) over all windows (equal lengths, so the mean of the window means)."""
    return math.exp(window_nll(model, windows, batch_size, desc).mean().item())
