"""Parse a ``.gguf`` source once per process.

transformers parses a GGUF file each time it is asked for the config, the tokenizer or the weights (gguf's
``GGUFReader`` walks every metadata field: seconds on a real file), and the weight check reads its tensor table too,
so one conversion used to parse the same file six times. ``shared_gguf()`` is the scope of one load through
transformers: inside it, ``gguf.GGUFReader`` of a file in read mode is the one reader kept per file version (path,
size, modification time), transformers' metadata parse (``load_gguf_checkpoint`` without tensors) is kept the same way
(each caller gets its own copy), and gguf's tensor-name map is built once per architecture and layer count instead of
once per submodule. What is read is the same; only the repeated parsing is gone. A changed file is a new version. The
reader is let go once the weights are read (the last thing read from the file), so the pages it mapped do not stay
in the process's memory.
"""

import contextlib
import copy
import functools
import os


def file_version(path) -> tuple[str, int, int]:
    """(path, size, modification time): the key under which what was read from a file is kept (OSError if absent)."""
    info = os.stat(path)
    return os.fspath(path), info.st_size, info.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _reader(path: str, size: int, mtime_ns: int):
    import gguf  # the optional GGUF library: loaded only for a GGUF source

    return gguf.GGUFReader(path)


def gguf_reader(path):
    """gguf's ``GGUFReader`` of ``path`` (read-only), parsed once per file version."""
    return _reader(*file_version(path))


@functools.lru_cache(maxsize=2)
def _metadata(load, path: str, size: int, mtime_ns: int) -> dict:
    return load(path, return_tensors=False)


_ACTIVE = []  # one entry while a shared_gguf scope is open (an inner one changes nothing)


@contextlib.contextmanager
def shared_gguf():
    """Within: every GGUF read in read mode goes through :func:`gguf_reader`, and transformers' metadata parse and
    gguf's tensor-name map are kept (see the module's docstring). Restored on exit; re-entrant."""
    if _ACTIVE:
        yield
        return
    import gguf  # the optional GGUF library: loaded only for a GGUF source
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    reader, load, name_map = gguf.GGUFReader, hf_gguf.load_gguf_checkpoint, gguf.get_tensor_name_map

    def open_reader(path, mode="r"):
        return gguf_reader(path) if mode == "r" else reader(path, mode)

    def load_checkpoint(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs.get("model_to_load") is not None:
            try:
                return load(path, return_tensors=return_tensors, **kwargs)
            finally:
                _reader.cache_clear()  # the weights are read: let the file's mapped pages go
        return copy.deepcopy(_metadata(load, *file_version(path)))

    gguf.GGUFReader, hf_gguf.load_gguf_checkpoint = open_reader, load_checkpoint
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    _ACTIVE.append(True)
    try:
        yield
    finally:
        _ACTIVE.pop()
        gguf.GGUFReader, hf_gguf.load_gguf_checkpoint, gguf.get_tensor_name_map = reader, load, name_map
