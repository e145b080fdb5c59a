"""Run a causal LM one decoder layer at a time: the model is never whole in memory.

- ``LayerwiseModel``: the architecture built on the meta device (no memory), whose decoder layers are materialised
  one at a time from a reader (``load`` / ``release``), run with the model's own RoPE and masks (``run``), plus the
  embedding and the output head (logits and the next-token loss gradient, computed in vocabulary chunks).
- ``Spill``: tensors kept in memory up to a limit, on disk beyond it.

Tensors come from a ``convert.readers.TensorReader``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .readers import TensorReader, skeleton
from .adapters import EMBED, FINAL_NORM, HEAD, layer_prefix
from .files import write_error

VOCAB_CHUNK = 16384  # output-head rows cast to float32 at a time


def causal_mask(config, kind: str, h: torch.Tensor, pos: torch.Tensor):
    """The attention mask of a layer of type ``kind`` (``sliding_attention`` or full) for hidden states ``h`` (B, T, d)
    at positions ``pos``, with no padding and no cache (None where SDPA's causal flag suffices)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
    return make(config, h, None, None, position_ids=pos)  # no padding, no cache (its name differs across versions)


class LayerwiseModel:
    """A decoder-only causal LM read from ``reader`` and run one decoder layer at a time on ``device`` in ``dtype``."""

    def __init__(self, config, reader: TensorReader, device: torch.device, dtype: torch.dtype, layer_types: list[str],
                 io: dict | None = None):
        """``io``: ``embedding_multiplier``, ``logits_scaling`` and ``final_logit_softcapping`` of the model (the
        export's config fields, the source's ``Layout.decoder``); absent ones are neutral."""
        self.config, self.reader, self.device, self.dtype = config, reader, torch.device(device), dtype
        self.model = skeleton(config)
        self.base = self.model.model
        self.layer_types = list(layer_types)
        self.num_layers = len(self.base.layers)
        io = io or {}
        self.embedding_multiplier = float(io.get("embedding_multiplier", 1.0))
        self.logits_scaling = float(io.get("logits_scaling", 1.0))
        self.softcap = io.get("final_logit_softcapping")
        with torch.device(self.device):  # the real RoPE tables (the skeleton's are on meta)
            self.rotary = type(self.base.rotary_emb)(config=config)
        self.rotary.to(self.device)
        self.per_type_rope = isinstance(getattr(self.rotary, "rope_type", None), dict)  # Gemma 3: one per layer type
        names = reader.names()
        self.head_name = HEAD if HEAD in names else EMBED
        self._norm = None

    # --- tensors -------------------------------------------------------------------------------------------------
    def layer_names(self, i: int) -> list[str]:
        return [layer_prefix(i) + k for k in self.base.layers[i].state_dict()]

    def load(self, i: int) -> torch.nn.Module:
        """Materialise decoder layer ``i`` (its weights in ``dtype`` on ``device``) and return it."""
        prefix = layer_prefix(i)
        tensors = self.reader.get(self.layer_names(i))
        layer = self.base.layers[i]
        layer.load_state_dict({n[len(prefix):]: t.to(self.device, self.dtype) for n, t in tensors.items()},
                              strict=True, assign=True)
        layer.requires_grad_(False)
        return layer

    def release(self, i: int) -> None:
        self.base.layers[i].to("meta")

    # --- running -------------------------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.reader.get([EMBED])[EMBED]  # read to the CPU: only the rows of ``ids`` go to the device
        h = table[ids.to(table.device)].to(self.device, self.dtype)  # (B, T, d)
        if self.embedding_multiplier != 1.0:  # Gemma, Granite: the scale in the embedding dtype
            h = h * torch.tensor(self.embedding_multiplier, dtype=self.dtype, device=self.device)
        return h

    def _mask(self, kind: str, h: torch.Tensor, pos: torch.Tensor):
        return causal_mask(self.config, kind, h, pos)

    def run(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``i`` (loaded) on hidden states ``h`` (B, T, d) at positions 0..T-1."""
        h = h.to(self.device)
        pos = torch.arange(h.shape[1], device=self.device)[None]
        rope = self.rotary(h, pos, layer_type=self.layer_types[i]) if self.per_type_rope else self.rotary(h, pos)
        out = self.base.layers[i](h, attention_mask=self._mask(self.layer_types[i], h, pos),
                                  position_embeddings=rope, position_ids=pos, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    def norm(self) -> torch.nn.Module:
        if self._norm is None:
            w = self.reader.get([FINAL_NORM])[FINAL_NORM]
            self.base.norm.load_state_dict({"weight": w.to(self.device, self.dtype)}, assign=True)
            self.base.norm.requires_grad_(False)
            self._norm = self.base.norm
        return self._norm

    def _head_chunks(self):
        vocab = self.config.vocab_size
        for start in range(0, vocab, VOCAB_CHUNK):
            yield start, self.reader.rows(self.head_name, start, min(vocab, start + VOCAB_CHUNK)).to(
                self.device, torch.float32)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits (B, T, V) of final hidden states ``h``."""
        with torch.no_grad():
            hn = self.norm()(h.to(self.device)).float()
            return self._finish(torch.cat([hn @ w.T for _, w in self._head_chunks()], dim=-1))

    def _finish(self, logits: torch.Tensor) -> torch.Tensor:
        """Granite's logit scaling and Gemma 2's soft cap on raw head outputs."""
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def head_gradient(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """d(sum of next-token cross-entropy over ``ids`` (B, T))/dh for final hidden states ``h`` (B, T, d).

        The logits are never whole: the log-sum-exp runs over vocabulary chunks, then ``softmax - onehot`` is
        multiplied back chunk by chunk (float32, as the loss of a float32 forward)."""
        h = h.detach().to(self.device).requires_grad_(True)
        with torch.enable_grad():
            hn = self.norm()(h).float()
        x = hn.detach()[:, :-1].reshape(-1, hn.shape[-1])  # (N, d) positions that have a next token
        target = ids[:, 1:].reshape(-1).to(self.device)
        lse = torch.full((x.shape[0],), -float("inf"), device=self.device)
        for _, w in self._head_chunks():
            lse = torch.logaddexp(lse, torch.logsumexp(self._finish(x @ w.T), dim=-1))
        gx = torch.zeros_like(x)
        for start, w in self._head_chunks():
            z = self._finish(x @ w.T)
            p = torch.exp(z - lse[:, None])  # (N, chunk) softmax
            inside = (target >= start) & (target < start + w.shape[0])
            p[inside.nonzero().flatten(), (target[inside] - start)] -= 1.0
            if self.softcap is not None:  # d(c tanh(u / c))/du = 1 - (z / c)^2
                p = p * (1 - (z / self.softcap) ** 2)
            if self.logits_scaling != 1.0:
                p = p / self.logits_scaling
            gx += p @ w
        grad_hn = torch.zeros_like(hn)
        grad_hn[:, :-1] = gx.reshape(hn.shape[0], hn.shape[1] - 1, -1)
        with torch.enable_grad():
            torch.autograd.backward(hn, grad_hn)
        return h.grad.detach().to(self.dtype)


class Spill:
    """Named tensors in memory until ``limit`` bytes, then in files under ``folder`` (created on first use)."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit, self.used = Path(folder), limit, 0
        self.ram: dict[str, object] = {}
        self.bytes: dict[str, int] = {}

    @staticmethod
    def _size(obj) -> int:
        if torch.is_tensor(obj):
            return obj.numel() * obj.element_size()
        if isinstance(obj, (list, tuple)):
            return sum(Spill._size(o) for o in obj)
        if isinstance(obj, dict):
            return sum(Spill._size(o) for o in obj.values())
        return sum(Spill._size(v) for v in getattr(obj, "__dict__", {}).values())

    def put(self, name: str, obj) -> None:
        size = self._size(obj)
        if self.used + size <= self.limit:
            self.ram[name], self.bytes[name] = obj, size
            self.used += size
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.pt"
        try:
            torch.save(obj, path)
        except OSError as err:
            path.unlink(missing_ok=True)
            raise write_error(err, self.folder) from None

    def get(self, name: str):
        if name in self.ram:
            return self.ram[name]
        return torch.load(self.folder / f"{name}.pt", weights_only=False)

    def close(self) -> None:
        """Drop everything (the folder too)."""
        import shutil

        self.ram.clear()
        self.used = 0
        shutil.rmtree(self.folder, ignore_errors=True)

    def pop(self, name: str):
        if name in self.ram:
            self.used -= self.bytes.pop(name)
            return self.ram.pop(name)
        path = self.folder / f"{name}.pt"
        obj = torch.load(path, weights_only=False)
        path.unlink()
        return obj


def run_layers(lw: LayerwiseModel, windows: torch.Tensor, desc: str) -> torch.Tensor:
    """Final hidden states of ``windows`` through every layer of ``lw``, one layer at a time."""
    with torch.no_grad():
        h = lw.embed(windows)
        for i in tqdm(range(lw.num_layers), desc=desc, unit="layer"):
            lw.load(i)
            h = lw.run(i, h)
            lw.release(i)
    return h
