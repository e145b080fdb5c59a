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
    if windows.shape[-1] < 2:
        raise MLAError("perplexity needs windows of at least 2 tokens")
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch"):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
            nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # (B, T-1)
            out.append(nll.mean(1).cpu())
    return torch.cat(out).double()


def perplexity(model, windows: torch.LongTensor, batch_size: int = 4, desc: str = "ppl") -> float:
    """exp(mean NLL) over all windows (equal lengths, so the mean of the window means)."""
    return math.exp(window_nll(model, windows, batch_size, desc).mean().item())
