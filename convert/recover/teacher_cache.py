"""The teacher's top-k next-token distributions of the training windows (``teacher_topk``), kept on the host the
first time a window is seen: later passes over a window distil from it without a teacher forward."""

from __future__ import annotations

import os

import torch

from ..errors import MLAError
from .losses import topk_targets


def host_memory() -> int:
    """The host's physical memory, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(k: int, vocab: int, windows: int, seq_len: int, host_bytes: int | None = None,
               processes: int = 1) -> int:
    """The bytes the caches of the host hold once every window is kept: each of its ``processes`` keeps its own, of
    up to ``windows`` windows (``k`` clamped to vocab - 1 as ``topk_targets`` does); MLAError when that exceeds half
    of the host's memory (``host_bytes``, default ``host_memory()``)."""
    k = min(k, vocab - 1)
    need = processes * windows * seq_len * (8 * k + 4)  # float32 log-probabilities + int32 ids per token, float32 rest
    host = host_bytes if host_bytes is not None else host_memory()
    if need > host // 2:
        held = f"the cache of {windows} windows of {seq_len}" if processes == 1 else \
            f"the caches of {processes} processes, each of up to {windows} windows of {seq_len},"
        raise MLAError(f"teacher_topk={k}: {held} would hold {need / 2**30:.1f} GiB on the host, more than half of "
                       f"its {host / 2**30:.1f} GiB; lower teacher_topk")
    return need


class TeacherCache:
    """Row index of a training window -> its (log-probabilities (T, k), ids (T, k), rest (T,)), on the CPU."""

    def __init__(self, k: int, temperature: float):
        self.k, self.temperature = k, temperature
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.hits = self.misses = 0

    def lookup(self, rows: list[int], device):
        """The targets of windows ``rows`` flattened to (B*T, k), (B*T, k), (B*T,) on ``device``; None unless every
        row is kept."""
        if not all(r in self.rows for r in rows):
            return None
        self.hits += len(rows)
        return self._stack([self.rows[r] for r in rows], device)

    def put(self, rows: list[int], logits: torch.Tensor, device):
        """Keep the top-k of the teacher's ``logits`` (B, T, V) of windows ``rows``; their targets as ``lookup``
        (computed where the logits are: one copy of each to the host, none back)."""
        targets = topk_targets(logits, self.k, self.temperature)  # (B, T, k), (B, T, k), (B, T)
        kept = [t.cpu() for t in targets]
        for i, row in enumerate(rows):
            self.rows[row] = tuple(t[i].clone() for t in kept)  # its own storage: a batch is not kept alive by one row
        self.misses += len(rows)
        return tuple(t.flatten(0, 1).to(device) for t in targets)  # (B*T, k), (B*T, k), (B*T,)

    @staticmethod
    def _stack(entries, device):
        return tuple(torch.cat([e[j] for e in entries]).to(device) for j in range(3))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for entry in self.rows.values() for t in entry)
