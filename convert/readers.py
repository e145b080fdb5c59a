"""Tensors of a checkpoint by name, read on demand: the model is never whole in memory.

- ``TensorReader``: the interface (``names``, ``get``, ``rows``).
- ``SafetensorsReader`` reads a folder's shards with plain file reads (only the requested tensors);
  ``StateDictReader`` serves a model already in memory (GGUF sources, ``.bin`` checkpoints and Hub ids, which
  transformers loads whole); ``RenamedReader`` serves a multimodal checkpoint's text model under standard names.
- ``open_reader`` picks one for a source; ``skeleton`` is the architecture on the meta device (its tensor names).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .adapters import EMBED, HEAD, TEXT_PREFIXES
from .errors import MLAError
from .sources import load_weights
from .weights import safetensors_files, safetensors_header


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
        row = int(torch.Size(shape[1:]).numel()) * torch.empty((), dtype=dtype).element_size()  # host
        out = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=dtype)  # host: readers give CPU tensors
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


def text_reader(reader: TensorReader) -> TensorReader:
    """``reader`` itself when it holds the embedding, else its text model's tensors renamed."""
    names = reader.names()
    if EMBED in names:
        return reader
    for prefixes in TEXT_PREFIXES:
        if prefixes["model."] + EMBED[len("model."):] in names:
            return RenamedReader(reader, prefixes)
    return reader


def open_reader(source, config, log=None) -> TensorReader:
    """The weights of ``source``: read tensor by tensor from a local safetensors folder that holds every tensor the
    architecture needs under its standard name; otherwise (GGUF, ``.bin``, Hub ids, renamed tensors) the model is
    loaded whole by transformers and served from memory."""

    local = source.local
    if local is not None and not source.gguf_file and local.is_dir():

        if safetensors_files(local, source.spec) is not None:
            reader = text_reader(SafetensorsReader(local))
            need = [n for n in skeleton(config).state_dict() if n != HEAD or not config.tie_word_embeddings]
            if set(need) <= reader.names():
                return reader
    if log is not None:
        log(f"{source.description}: not a safetensors folder with standard tensor names; loading it whole")
    return text_reader(StateDictReader(load_weights(source, config=config)))


def skeleton(config):
    """The model for ``config`` on the meta device: its module tree and tensor names, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
