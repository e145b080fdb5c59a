"""Stage 7, save: what an export folder holds: sharded safetensors, the remote code, training checkpoints.

The folder itself is built atomically by ``convert.files`` (a temporary sibling renamed into place).
"""

import errno
import json
import os
import shutil
from pathlib import Path

import torch

from .files import nearly_full, write_error

MODELING_DIR = Path(__file__).resolve().parent.parent / "mla_modeling"
REMOTE_CODE_FILES = ("configuration_mla.py", "modeling_mla.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mla.MLAConfig",
    "AutoModel": "modeling_mla.MLAModel",
    "AutoModelForCausalLM": "modeling_mla.MLAForCausalLM",
}


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary sibling, then rename: a kill leaves the previous checkpoint whole, and a failed
    write (a full disk) leaves no temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, RuntimeError) and nearly_full(tmp.parent)  # torch's writer reports ENOSPC this way
        tmp.unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def save_state_dict(state: dict[str, torch.Tensor], folder: Path, max_shard_size: str = "2GB") -> list[str]:
    """Write ``model.safetensors`` or shards + ``model.safetensors.index.json``; return the file names."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    writer = ShardWriter(folder, int(max_shard_size[:-2]) * units[max_shard_size[-2:].upper()])
    for name, tensor in state.items():
        writer.add(name, tensor)
    return writer.close()


def copy_remote_code(folder: Path) -> None:
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(MODELING_DIR / name, folder / name)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
