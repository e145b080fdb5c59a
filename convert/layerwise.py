"""Run and rewrite a causal LM one decoder layer at a time: the model is never whole in memory.

- ``TensorReader``: tensors by name, read on demand. ``SafetensorsReader`` reads a folder's shards with
  ``safe_open`` (only the requested tensors); ``StateDictReader`` serves a model already in memory (GGUF sources,
  ``.bin`` checkpoints and Hub ids, which transformers loads whole).
- ``LayerwiseModel``: the architecture built on the meta device (no memory), whose decoder layers are materialised
  one at a time from a reader (``load`` / ``release``), run with the model's own RoPE and masks (``run``), plus the
  embedding and the output head (logits and the next-token loss gradient, computed in vocabulary chunks).
- ``Spill``: tensors kept in memory up to a limit, on disk beyond it.
- ``ShardWriter``: an export written shard by shard (``model-0000k-of-0000n.safetensors`` + index, or one
  ``model.safetensors``); a full disk is a one-line MLAError.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch

from .errors import MLAError

VOCAB_CHUNK = 16384  # output-head rows cast to float32 at a time


class TensorReader:
    def names(self) -> set[str]:
        raise NotImplementedError

    def get(self, names: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsReader(TensorReader):
    """The safetensors weights of a folder (``model.safetensors`` or shards with an index), read tensor by tensor.

    Tensors are read with plain file reads into fresh memory (no memory map), so a tensor costs its own size and
    nothing stays resident once it is dropped."""

    def __init__(self, folder: Path):
        from .weights import safetensors_files, safetensors_header

        self.folder = Path(folder)
        self.entries: dict[str, tuple[str, torch.dtype, tuple[int, ...], int]] = {}  # name: (file, dtype, shape, offset)
        for file in safetensors_files(self.folder, str(folder)) or []:
            for name, (dtype, shape, offset) in safetensors_header(self.folder / file, str(folder)).items():
                if dtype not in _DTYPES:
                    raise MLAError(f"{file}: tensor {name} has dtype {dtype}, which is not supported here")
                self.entries[name] = (file, _DTYPES[dtype], shape, offset)

    def names(self) -> set[str]:
        return set(self.entries)

    def _read(self, f, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        _, dtype, shape, offset = self.entries[name]
        stop = shape[0] if stop is None else stop
        if not shape:
            start, stop = 0, 1
        row = int(torch.Size(shape[1:]).numel()) * torch.empty((), dtype=dtype).element_size()
        out = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=dtype)
        f.seek(offset + start * row)
        view = memoryview(out.view(torch.uint8).numpy() if out.dim() else out.reshape(1).view(torch.uint8).numpy())
        if f.readinto(view) != (stop - start) * row:
            raise MLAError(f"{self.folder / self.entries[name][0]} is truncated (tensor {name})")
        return out

    def get(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.entries[n][0], []).append(n)
        out = {}
        for file, group in by_file.items():
            with open(self.folder / file, "rb", buffering=0) as f:
                for n in group:
                    out[n] = self._read(f, n)
        return out

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        with open(self.folder / self.entries[name][0], "rb", buffering=0) as f:
            return self._read(f, name, start, min(stop, self.entries[name][2][0]))


class StateDictReader(TensorReader):
    """Tensors of a model in memory (kept alive by this reader)."""

    def __init__(self, model):
        self.model = model
        self.state = model.state_dict()

    def names(self) -> set[str]:
        return set(self.state)

    def get(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: self.state[n].detach() for n in names}

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.state[name].detach()[start:stop]


class RenamedReader(TensorReader):
    """Tensors of ``inner`` under our names: ``prefixes`` maps our name prefixes to the stored ones (the text model
    of a multimodal checkpoint: ``model.`` -> ``model.language_model.``)."""

    def __init__(self, inner: TensorReader, prefixes: dict[str, str]):
        self.inner = inner
        self.stored = {}
        inner_names = inner.names()
        for ours, theirs in prefixes.items():
            for n in inner_names:
                if n.startswith(theirs):
                    self.stored.setdefault(ours + n[len(theirs):], n)

    def names(self) -> set[str]:
        return set(self.stored)

    def get(self, names: list[str]) -> dict[str, torch.Tensor]:
        got = self.inner.get([self.stored[n] for n in names])
        return {n: got[self.stored[n]] for n in names}

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.inner.rows(self.stored[name], start, stop)


# Where the text model of a multimodal checkpoint keeps its tensors (transformers 5 names, then the older ones).
TEXT_PREFIXES = ({"model.": "model.language_model.", "lm_head.": "lm_head."},
                 {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."})


def text_reader(reader: TensorReader) -> TensorReader:
    """``reader`` itself when it holds ``model.embed_tokens.weight``, else its text model's tensors renamed."""
    names = reader.names()
    if "model.embed_tokens.weight" in names:
        return reader
    for prefixes in TEXT_PREFIXES:
        if prefixes["model."] + "embed_tokens.weight" in names:
            return RenamedReader(reader, prefixes)
    return reader


def open_reader(source, config, log=None) -> TensorReader:
    """The weights of ``source``: read tensor by tensor from a local safetensors folder that holds every tensor the
    architecture needs under its standard name; otherwise (GGUF, ``.bin``, Hub ids, renamed tensors) the model is
    loaded whole by transformers and served from memory."""
    from .sources import load_model

    local = source.local
    if local is not None and not source.gguf_file and local.is_dir():
        from .weights import safetensors_files

        if safetensors_files(local, source.spec) is not None:
            reader = text_reader(SafetensorsReader(local))
            need = [n for n in skeleton(config).state_dict() if n != "lm_head.weight" or not config.tie_word_embeddings]
            if set(need) <= reader.names():
                return reader
    if log is not None:
        log(f"{source.description}: not a safetensors folder with standard tensor names; loading it whole")
    return text_reader(StateDictReader(load_model(source, config=config)[0]))


def skeleton(config):
    """The model for ``config`` on the meta device: its module tree and tensor names, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


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
        self.head_name = "lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight"
        self._norm = None

    # --- tensors -------------------------------------------------------------------------------------------------
    def layer_names(self, i: int) -> list[str]:
        return [f"model.layers.{i}.{k}" for k in self.base.layers[i].state_dict()]

    def load(self, i: int) -> torch.nn.Module:
        """Materialise decoder layer ``i`` (its weights in ``dtype`` on ``device``) and return it."""
        prefix = f"model.layers.{i}."
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
        table = self.reader.get(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
        h = table[ids].to(self.device, self.dtype)  # (B, T, d)
        if self.embedding_multiplier != 1.0:  # Gemma, Granite: the scale in the embedding dtype
            h = h * torch.tensor(self.embedding_multiplier, dtype=self.dtype)
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
            w = self.reader.get(["model.norm.weight"])["model.norm.weight"]
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


def write_error(err: OSError, folder: Path) -> MLAError:
    if err.errno == errno.ENOSPC:
        return MLAError(f"no space left on the device while writing into {folder.parent}: free some space and run "
                        "again (nothing was left behind)")
    return MLAError(f"cannot write into {folder}: {err.strerror or err}")


class ShardWriter:
    """Tensors added in any order, written in shards of at most ``max_bytes`` (unless one tensor alone is larger);
    ``close`` names them the HF way. At most one shard's tensors are held in memory."""

    def __init__(self, folder: Path, max_bytes: int = 2**30):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + size > self.max_bytes:  # a shard exceeds the size only for one big tensor
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        path = self.folder / f".part-{len(self.parts):05d}.safetensors"
        try:
            save_file(self.buffer, str(path), metadata={"format": "pt"})
        except OSError as err:
            path.unlink(missing_ok=True)
            raise write_error(err, self.folder) from None
        self.parts.append((path, sorted(self.buffer)))
        self.total += self.buffered
        self.buffer, self.buffered = {}, 0

    def close(self) -> list[str]:
        """Write what is left, rename the shards and write the index; return the file names."""
        self.flush()
        if len(self.parts) == 1:
            os.replace(self.parts[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        n, weight_map, files = len(self.parts), {}, []
        for k, (path, names) in enumerate(self.parts, 1):
            name = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.folder / name)
            weight_map.update({t: name for t in names})
            files.append(name)
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return files
