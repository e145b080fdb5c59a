"""One typed config for ``mla convert``: its field docs become ``--help``, recipe YAML keys are its field names."""

import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .data import CALIBRATION_DEFAULT
from .errors import MLAError
from .factorize import FACTOR_METHODS
from .ropesplit import ROPE_METHODS


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ConvertConfig:
    kv_budget: float | None = opt(
        None,
        "Cached values per token per layer / the original's 2*num_key_value_heads*head_dim, in (0, 1]. "
        "1 is lossless. Default 0.3125 unless --kv-lora-rank/--rope-dim are given.",
    )
    kv_lora_rank: int | None = opt(None, "Latent width r per layer (overrides the budget split).")
    rope_dim: int | None = opt(None, "Decoupled RoPE key width per layer (even; overrides the budget split).")
    rope_method: str = opt(
        "rotate",
        "RoPE split: rotate (cross-head rotation per frequency, components ranked by the estimated loss of losing "
        "RoPE), rotate-norm (same rotation, ranked by |q|*|k|), or the MHA2MLA per-head selections norm, high, uniform.",
    )
    factor_method: str = opt(
        "fisher",
        "Joint K/V latent: fisher (in the loss-gradient metric), pca (calibrated, K/V balanced) or svd (weights only).",
    )
    rank_alloc: str = opt(
        "fisher",
        "Share the budget between layers: fisher (by estimated loss, per-layer latent and RoPE widths) or uniform.",
    )
    rope_share: float = opt(1 / 3, "Share of the KV budget given to the decoupled RoPE key (the rest is the latent).")
    rope_span: int = opt(512, "Attention distance (tokens) over which losing RoPE is scored by --rope-method rotate.")
    calib: str = opt(
        CALIBRATION_DEFAULT,
        "Calibration text: brown[:genres] (Brown corpus via npm), pydoc (no download), bbc[:cat], a .txt/.jsonl "
        "file or folder, or hf:ID[:CONFIG]:SPLIT[:COLUMN]. Never calibrate on your evaluation text.",
    )
    calib_seqs: int = opt(16, "Number of calibration sequences.")
    calib_len: int = opt(512, "Tokens per calibration sequence.")
    seed: int = opt(0, "Seed for choosing calibration windows (the export is deterministic given the seed).")
    dtype: str = opt("float32", "Dtype of the exported weights: float32, bfloat16, float16 or auto (the source's).")
    verify_seqs: int = opt(2, "Sequences of calibration text on which the export's logits are compared to the source's.")
    batch_size: int = opt(4, "Batch size for calibration and verification forwards.")
    overwrite: bool = opt(False, "Replace an existing non-empty OUT.")

    def validate(self) -> None:
        if self.kv_budget is not None and not 0 < self.kv_budget <= 1:
            raise MLAError(f"--kv-budget must be in (0, 1], got {self.kv_budget}")
        if self.kv_budget is not None and (self.kv_lora_rank is not None or self.rope_dim is not None):
            raise MLAError("give either --kv-budget or --kv-lora-rank/--rope-dim, not both")
        if self.kv_lora_rank is not None and self.kv_lora_rank < 1:
            raise MLAError(f"--kv-lora-rank must be >= 1, got {self.kv_lora_rank}")
        if self.rope_dim is not None and (self.rope_dim < 0 or self.rope_dim % 2):
            raise MLAError(f"--rope-dim must be a non-negative multiple of 2, got {self.rope_dim}")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise MLAError(f"--dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        choices = {"rope_method": ROPE_METHODS, "factor_method": FACTOR_METHODS, "rank_alloc": ("fisher", "uniform")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MLAError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0 <= self.rope_share < 1:
            raise MLAError(f"--rope-share must be in [0, 1), got {self.rope_share}")
        for name in ("calib_seqs", "calib_len", "batch_size", "rope_span"):
            if getattr(self, name) < 1:
                raise MLAError(f"--{name.replace('_', '-')} must be >= 1")


def config_fields():
    return fields(ConvertConfig)


def load_recipe(path: str | Path, section: str = "convert") -> dict:
    """Read the ``section`` of a recipe YAML as ConvertConfig overrides; unknown keys are an error naming them."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise MLAError(f"recipe not found: {path}") from None
    except (OSError, yaml.YAMLError) as err:
        raise MLAError(f"could not read recipe {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MLAError(f"recipe {path} must be a mapping")
    unknown_top = sorted(set(data) - {"convert", "recover", "source", "description"})
    if unknown_top:
        raise MLAError(f"recipe {path}: unknown key {unknown_top[0]!r} (allowed: convert, recover, source, description)")
    values = data.get(section) or {}
    if not isinstance(values, dict):
        raise MLAError(f"recipe {path}: '{section}' must be a mapping")
    known = {f.name: f for f in config_fields()}
    for key, value in values.items():
        if key not in known:
            raise MLAError(f"recipe {path}: unknown key {section}.{key!r}")
        allowed = typing.get_args(known[key].type) or (known[key].type,)
        is_bool = isinstance(value, bool)
        if not (isinstance(value, allowed) and (bool in allowed or not is_bool)
                or float in allowed and isinstance(value, int) and not is_bool):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise MLAError(f"recipe {path}: {section}.{key} must be {names}, got {value!r}")
    return values

