"""Stage 7, save: atomic export folders and sharded safetensors.

Everything is built in a temporary sibling of OUT and renamed into place at the end, so an error or Ctrl-C never
leaves a half-written OUT.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import MLAError

MODELING_DIR = Path(__file__).resolve().parent.parent / "mla_modeling"
REMOTE_CODE_FILES = ("configuration_mla.py", "modeling_mla.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mla.MLAConfig",
    "AutoModel": "modeling_mla.MLAModel",
    "AutoModelForCausalLM": "modeling_mla.MLAForCausalLM",
}


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MLAError(f"OUT {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MLAError(f"OUT {out} exists and is not empty (use --overwrite to replace it)")
    if not out.parent.exists():
        raise MLAError(f"the parent folder of OUT does not exist: {out.parent}")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool):
    """Yield a temporary sibling folder; on success replace ``out`` with it, on any error remove it."""
    out = Path(out).resolve()
    check_out(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_state_dict(state: dict[str, torch.Tensor], folder: Path, max_shard_size: str = "2GB") -> list[str]:
    """Write ``model.safetensors`` or shards + ``model.safetensors.index.json``; return the file names."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sorted(split.filename_to_tensors)


def copy_remote_code(folder: Path) -> None:
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(MODELING_DIR / name, folder / name)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
