"""The resumable checkpoint of ``mla finetune`` in ``OUT.ckpt/``: what identifies a run (its settings and digests of
what it reads), reading ``checkpoint.pt`` back, and the Ctrl-C flag that asks the training loop to checkpoint and stop.

A checkpoint resumes only the run that wrote it: its fingerprint covers the settings (but ``NOT_FINGERPRINTED``, and
the ``ADDED_LATER`` ones where they keep their earlier behaviour) and the digests of the converted model, the teacher
and the training and validation windows.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import MLAError
from ..save import save_checkpoint
from .config import RecoverConfig


CKPT_NAME = "checkpoint.pt"
# Keys that do not change the trained weights or the log; a resumed run may change them.
NOT_FINGERPRINTED = ("checkpoint_every", "device")
# Keys added after checkpoints were first written, with the default that does what runs did before them: left out of
# the fingerprint at that value, so a checkpoint written by an earlier version still resumes.
ADDED_LATER = {"frozen_dtype": "auto", "shard": False, "lora_lr": None, "teacher_topk": 0, "data_mix": "balanced",
               "local_batch": None}


def work_dir(out: Path) -> Path:
    """Checkpoints (and, for ``mla convert --recipe``, the training-free conversion) live beside OUT until it is done."""
    return out.parent / f"{out.name}.ckpt"


SAMPLES, SAMPLE_BYTES = 64, 4096  # a weight file's digest: its size, header and 64 samples of 4 KiB spread over it


def _file_digest(path: Path, h) -> None:
    """Feed ``h`` a file's name, size and ``SAMPLES`` chunks spread over it: any other checkpoint, even of the same
    architecture, differs in them, and an 8B teacher costs 256 KiB of reading, not 16 GB."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        for k in range(SAMPLES):
            f.seek(size * k // SAMPLES)
            h.update(f.read(SAMPLE_BYTES))


def _source_digest(source) -> str:
    """What identifies the teacher: its config and weight files (sampled), or its Hub id when it is not local."""
    h = hashlib.sha256()
    local = source.local
    if local is None:
        h.update(source.path.encode())
    elif local.is_file():  # a .gguf
        _file_digest(local, h)
    else:
        for path in sorted(local.iterdir()):
            if path.name == "config.json" or path.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
                _file_digest(path, h)
    return h.hexdigest()


def _tensor_digest(t: torch.Tensor | None) -> str:
    return hashlib.sha256(b"" if t is None else t.contiguous().numpy().tobytes()).hexdigest()


def run_inputs(converted: Path, teacher_source, windows: torch.LongTensor, val) -> dict[str, str]:
    """Digests of what a run reads besides its settings, by the name an error gives them: the converted model, the
    teacher, and the training and validation text (their token windows: the text's content and its tokenization)."""
    return {
        "the converted model": hashlib.sha256((converted / "mla_conversion.json").read_bytes()).hexdigest(),
        "the teacher": _source_digest(teacher_source),
        "the training text": _tensor_digest(windows),
        "the validation text": _tensor_digest(val),
    }


def run_fingerprint(cfg: RecoverConfig, inputs: dict[str, str]) -> str:
    blob = json.dumps({"cfg": fingerprinted_settings(cfg), "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprinted_settings(cfg: RecoverConfig) -> dict:
    """The settings that identify a run: all but ``NOT_FINGERPRINTED`` and the ``ADDED_LATER`` ones at their old
    behaviour's value."""
    return {k: v for k, v in asdict(cfg).items()
            if k not in NOT_FINGERPRINTED and not (k in ADDED_LATER and v == ADDED_LATER[k])}


def _changed(state: dict, cfg: RecoverConfig, inputs: dict[str, str]) -> list[str]:
    """The settings keys and the inputs in which ``state`` (a checkpoint) differs from this run."""
    old, new = state.get("settings", {}), fingerprinted_settings(cfg)
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    old_inputs = state.get("inputs", {})
    return keys + [name for name, digest in inputs.items() if old_inputs.get(name) != digest]


def read_checkpoint(path: Path, fingerprint: str, cfg: RecoverConfig, inputs: dict[str, str],
                     restart: bool) -> dict | None:
    """A checkpoint of this run (its ``fingerprint``) to resume from, None to start afresh; MLAError naming the changed
    settings and inputs when it is from another run."""
    if restart or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MLAError(f"checkpoint {path} is unreadable ({str(err).splitlines()[0][:200]}); "
                       "re-run with --restart to start over") from None
    if not isinstance(state, dict):
        raise MLAError(f"checkpoint {path} is not a checkpoint of mla finetune; re-run with --restart to start over")
    if state.get("fingerprint") != fingerprint:
        changed = _changed(state, cfg, inputs) or ["the converted model or the teacher"]
        raise MLAError(f"checkpoint {path} is from a different run (changed: {', '.join(changed)}); "
                       "re-run with --restart to discard it")
    return state


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trained tensors of an unsharded ``model``, on the CPU (``shard.trained_state`` for a sharded one)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def write_checkpoint(path: Path, fingerprint: str, cfg: RecoverConfig, inputs: dict[str, str], step: int,
                     trainable: dict[str, torch.Tensor], optimizer: dict, history: list[dict], evals: list[dict],
                     teacher_nll: float | None) -> None:
    """The distillation's state after ``step`` steps to ``path`` (atomically; ``read_checkpoint`` reads it back): what
    identifies the run, the ``trainable`` tensors, the ``optimizer``'s state dict, the logs so far and the RNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {
        "fingerprint": fingerprint, "settings": fingerprinted_settings(cfg), "inputs": inputs,
        "step": step, "trainable": trainable, "optimizer": optimizer,
        "history": history, "evals": evals, "teacher_nll": teacher_nll, "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})


class StopFlag:
    """First Ctrl-C asks the loop to checkpoint and stop at the end of the step; a second one interrupts at once."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers only work there
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        self.set = True
        signal.signal(signal.SIGINT, self._old or signal.default_int_handler)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False
