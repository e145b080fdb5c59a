"""The text of a run: token windows of ``data`` (training) and ``val_data`` (validation), which training windows make up
each step's batch, and the local files among the sources (which no output may replace)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import load_sources, load_texts, mixed_windows, read_budget, source_paths, token_windows
from .config import RecoverConfig


_PERMUTATION: dict = {}  # the current epoch's order, (n, seed, epoch) -> permutation


def batch_rows(step: int, batch_size: int, n: int, seed: int) -> torch.LongTensor:
    """Rows of the training windows used at ``step``: a fresh seeded permutation per epoch (a pure function of step)."""
    rows = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(j, n)
        key = (n, seed, epoch)
        if key not in _PERMUTATION:
            _PERMUTATION.clear()
            _PERMUTATION[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))  # host
        rows.append(int(_PERMUTATION[key][i]))
    return torch.tensor(rows, dtype=torch.long)  # host: indexes the CPU windows


def training_windows(tokenizer, cfg: RecoverConfig) -> torch.LongTensor:
    return mixed_windows(tokenizer, load_sources(cfg.data, read_budget(cfg.tokens)), cfg.seq_len, None, seed=cfg.seed,
                         mix=cfg.data_mix)


def validation_windows(tokenizer, cfg: RecoverConfig) -> torch.LongTensor | None:
    if not cfg.val_data or not cfg.val_tokens:
        return None
    return token_windows(tokenizer, load_texts(cfg.val_data, read_budget(cfg.val_tokens)), cfg.seq_len, cfg.val_tokens // cfg.seq_len, seed=0)


def data_inputs(cfg: RecoverConfig) -> list[Path]:
    """Local paths among the training and validation text sources (what no output may replace)."""
    return source_paths(cfg.data, cfg.val_data)
