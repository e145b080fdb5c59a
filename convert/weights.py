"""Check a model's config and weight files against each other before anything is allocated.

Only headers are read: the JSON header of each safetensors file, the tensor table of a GGUF file. A missing or
truncated shard, a GGUF with no tensors, a header shape that needs other than the bytes its data offsets hold, a
tensor whose shape differs from what ``config.json`` implies, a dimension that is not a positive integer, a
``rope_theta`` that is not a positive finite number, more or fewer layers than the files hold, or a config that
describes more values than the files hold is a one-line MLAError, so a wrong config or header can never make the
loader allocate a model (say a default 7B one) that the files do not hold. The layer count is compared with the files
(``check_config_file``) before transformers parses the config, whose classes build per-layer lists.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import re
from pathlib import Path

from .adapters import EMBED, expected_shapes, gguf_expected_sizes, read_layout
from .errors import MLAError, quote
from .gguf_memo import file_version, gguf_reader

MAX_HEADER = 100 * 2**20  # a safetensors JSON header larger than this is corrupt
MLA_MODEL_TYPE = "mla_retrofit"  # our exports (as convert.sources names it)
# bits per element of each safetensors dtype
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
              "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "C64": 64, "F4": 4,
              "F6_E2M3": 6, "F6_E3M2": 6}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_BLK = re.compile(r"^blk\.(\d+)\.")


def _bits(dtype) -> int:
    """Bits per element of a safetensors dtype; ValueError for one the format does not define."""
    if dtype not in DTYPE_BITS:
        raise ValueError(f"unknown dtype {quote(dtype)}")
    return DTYPE_BITS[dtype]


def _whole(value, least: int) -> bool:
    """An integer (not a bool, not a float) of at least ``least``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


class _Truncated(Exception):
    """A tensor's data reaches past the end of its file (``needed``: bytes of data the header asks for)."""

    def __init__(self, needed: int):
        super().__init__(needed)
        self.needed = needed


def _entry(name: str, info, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """``(dtype, shape, begin, end)`` of one header entry, its data offsets relative to the data section; ValueError
    unless its shape needs exactly the bytes its offsets hold and those lie inside the file."""
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_whole(x, 0) for x in shape):
        raise ValueError(f"tensor {quote(name)} has shape {quote(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(x, 0) for x in offsets) \
            or offsets[0] > offsets[1]:
        raise ValueError(f"tensor {quote(name)} has data offsets {quote(offsets)}")
    begin, end = int(offsets[0]), int(offsets[1])
    need = (math.prod(shape) * _bits(dtype) + 7) // 8
    if need != end - begin:
        raise ValueError(f"tensor {quote(name)} of shape {quote(shape)} ({dtype}) needs {need} bytes, its data "
                         f"offsets hold {end - begin}")
    if end > data_size:
        raise _Truncated(end)
    return str(dtype), tuple(int(x) for x in shape), begin, end


def _read_header(path: Path) -> tuple[dict, int, int]:
    """``(header JSON, header length, file size)`` of a safetensors file; ValueError when malformed."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n < 2 or n > min(MAX_HEADER, size - 8):
            raise ValueError("bad header length")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, n, size


def _overlap(spans: list[tuple[int, int, str]]) -> str | None:
    """The name of a tensor whose data overlaps another's, or None."""
    last = 0
    for begin, end, name in sorted(spans):
        if begin < last:
            return name
        last = max(last, end)
    return None


def safetensors_header(path: Path, spec: str) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """{name: (dtype, shape, absolute byte offset)} of one safetensors file, read from its header only.

    MLAError when the file cannot be read (naming why: permission denied, ...), its header is corrupt, a tensor's shape
    needs other than the bytes its data offsets hold, two tensors share bytes, or the data is cut short: no shape in
    the header can promise more than the file holds.
    """
    try:
        header, n, size = _read_header(path)
    except OSError as err:
        raise MLAError(f"could not load the weights of {spec}: cannot read {path.name}: "
                       f"{err.strerror or type(err).__name__}") from None
    except (ValueError, RecursionError):
        raise MLAError(f"could not load the weights of {spec}: {path.name} is not a readable safetensors file") \
            from None
    entries, spans, needed = {}, [], 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, begin, end = _entry(name, info, size - 8 - n)
        except _Truncated as cut:
            needed = max(needed, cut.needed)
            continue
        except (ValueError, KeyError, TypeError) as err:
            detail = f": {err}" if isinstance(err, ValueError) else ""
            raise MLAError(f"could not load the weights of {spec}: {path.name} is not a readable safetensors "
                           f"file{detail}") from None
        entries[name] = (dtype, shape, 8 + n + begin)
        spans.append((begin, end, name))
    if needed:
        raise MLAError(f"could not load the weights of {spec}: {path.name} is truncated ({size} bytes, its header "
                       f"needs {8 + n + needed})")
    if (name := _overlap(spans)) is not None:
        raise MLAError(f"could not load the weights of {spec}: {path.name} is not a readable safetensors file: the "
                       f"data of tensor {quote(name)} overlaps another tensor's")
    return entries


def _read_index(index: Path, spec: str) -> list[str]:
    """The shard files a ``model.safetensors.index.json`` lists; MLAError when unreadable or invalid."""
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except OSError as err:
        raise MLAError(f"could not load the weights of {spec}: cannot read {index.name}: "
                       f"{err.strerror or type(err).__name__}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise MLAError(f"could not load the weights of {spec}: {index.name} is not a valid index") from None
    if not all(isinstance(f, str) for f in files):
        raise MLAError(f"could not load the weights of {spec}: {index.name} is not a valid index")
    return files


def safetensors_files(folder: Path, spec: str) -> list[str] | None:
    """The safetensors files of ``folder`` (shards listed by the index, all present), or None when it holds only
    other weight formats; MLAError when a listed shard is missing or there are no weights."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = _read_index(index, spec)
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise MLAError(f"could not load the weights of {spec}: shard {missing[0]} is missing "
                           f"({len(missing)} of {len(files)} listed in {index.name})")
        return files
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    if any(folder.glob("pytorch_model*.bin")):
        return None  # pickled weights: transformers loads them with weights_only; no cheap header to check
    raise MLAError(f"could not load the weights of {spec}: no weights in {folder} (model.safetensors is missing)")


def safetensors_shapes(folder: Path, spec: str) -> dict[str, tuple[int, ...]] | None:
    """{name: shape} over all safetensors shards of ``folder`` (None when it holds only other weight formats)."""
    files = safetensors_files(folder, spec)
    if files is None:
        return None
    return {name: shape for file in files for name, (_, shape, _) in safetensors_header(folder / file, spec).items()}


@functools.lru_cache(maxsize=4)
def _read_gguf(path: str, size: int, mtime_ns: int) -> tuple[object, dict[str, int]]:
    """``(block_count or None, {name: number of elements})`` of a GGUF file, kept per file version: reading the tensor
    table takes seconds, and the config check and the weight check both need it. The reader maps every tensor onto
    the file's bytes, so a tensor whose shape needs more bytes than the file holds raises here."""
    reader = gguf_reader(path)
    try:
        arch = reader.get_field("general.architecture").contents()
        blocks = reader.get_field(f"{arch}.block_count").contents()
    except (AttributeError, TypeError, ValueError, IndexError):
        blocks = None
    return blocks, {t.name: int(t.n_elements) for t in reader.tensors}


def _gguf_table(path: Path, spec: str) -> tuple[object, dict[str, int]]:
    """:func:`_read_gguf` of ``path``; MLAError when unreadable (naming why) or corrupt."""
    try:
        blocks, tensors = _read_gguf(*file_version(path))
    except OSError as err:
        raise MLAError(f"could not load the weights of {spec}: cannot read {path.name}: "
                       f"{err.strerror or type(err).__name__}") from None
    except Exception as err:  # noqa: BLE001 - a corrupt GGUF raises many types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise MLAError(f"could not load the weights of {spec}: {first}") from None
    return blocks, dict(tensors)


def gguf_shapes(path: Path, spec: str) -> dict[str, int]:
    """{name: number of elements} of a GGUF file's tensors; MLAError when unreadable or empty."""
    _, tensors = _gguf_table(path, spec)
    if not tensors:
        raise MLAError(f"could not load the weights of {spec}: the GGUF file has metadata but no tensors")
    return tensors


# --- the config's own values ------------------------------------------------------------------------------------------

# key: (the smallest value it may have, whether it may be a list of one value per layer); an absent (None) value is
# the library's default or derived from the others (head_dim from the hidden size, KV heads from the query heads)
DIMENSIONS = {"vocab_size": (1, False), "hidden_size": (1, False), "intermediate_size": (1, True),
              "num_hidden_layers": (1, False), "num_attention_heads": (1, False), "num_key_value_heads": (1, False),
              "head_dim": (1, False), "kv_lora_rank": (1, True), "qk_rope_head_dim": (0, True),
              "qk_nope_head_dim": (1, False), "v_head_dim": (1, False)}  # the last four: MLA / DeepSeek configs


def _text_values(config) -> dict:
    """The values :func:`check_config` reads, from a parsed config (its text model's) or the raw ``config.json``."""
    if isinstance(config, dict):
        sub = config.get("text_config")
        return sub if isinstance(sub, dict) else config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {k: getattr(text, k, None) for k in (*DIMENSIONS, "rope_theta", "rope_parameters")}


def _positive_int(value) -> bool:
    return _whole(value, 1)


def _rope_thetas(values: dict) -> list:
    """Every ``rope_theta`` of a config: its own and those of its RoPE parameters (flat or one set per layer type)."""
    thetas = [values["rope_theta"]] if values.get("rope_theta") is not None else []
    rope = values.get("rope_parameters")
    sets = [rope] if isinstance(rope, dict) else []
    if isinstance(rope, dict) and not any(k in rope for k in ("rope_theta", "rope_type", "type")):
        sets = [v for v in rope.values() if isinstance(v, dict)]  # one set per layer type
    return thetas + [s["rope_theta"] for s in sets if s.get("rope_theta") is not None]


def _check_dimension(key: str, value, spec: str) -> None:
    least, per_layer = DIMENSIONS[key]
    if per_layer and isinstance(value, list) and value and all(_whole(v, least) for v in value):
        return
    if not _whole(value, least):
        what = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise MLAError(f"config of {spec} is invalid: {key} {quote(value)} is not {what}")


def check_config(config, spec: str) -> None:
    """MLAError unless the dimensions of ``config`` (a parsed config or the raw ``config.json``) are positive integers
    and its ``rope_theta`` values positive finite numbers: checked before anything is sized or computed from them."""
    values = _text_values(config)
    for key in DIMENSIONS:
        if values.get(key) is not None:
            _check_dimension(key, values[key], spec)
    heads, hidden = values.get("num_attention_heads"), values.get("hidden_size")
    if values.get("head_dim") is None and _positive_int(heads) and _positive_int(hidden) and hidden < heads:
        raise MLAError(f"config of {spec} is invalid: hidden_size {hidden} is smaller than num_attention_heads "
                       f"{heads} and there is no head_dim")
    for theta in _rope_thetas(values):
        if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not 0 < theta < math.inf:
            raise MLAError(f"config of {spec} is invalid: rope_theta {quote(theta)} is not a positive finite number")


# --- the layer count, compared with what the files hold before anything loops over it ---------------------------------


def _text_names(names) -> list[str]:
    """The tensor names of the text model: a multimodal checkpoint's ``language_model`` ones, else all."""
    names = list(names)
    text = [n for n in names if "language_model" in n]
    return text or names


def _layers(names, pattern: re.Pattern) -> dict[int, str]:
    """{layer index: the prefix its tensors' names start with} of the names that ``pattern`` matches."""
    found = {}
    for name in names:
        if m := pattern.search(name):
            found[int(m.group(1))] = name[: m.start(1)]
    return found


def _check_layer_count(layers: dict[int, str], n_tensors: int, n_layers, spec: str) -> None:
    """MLAError when the config claims more layers than the files hold: compared with the highest layer found (or
    the number of tensors when no name says its layer), so nothing here grows with the claimed count."""
    if not _positive_int(n_layers) or n_tensors == 0:
        return
    if layers:
        have = max(layers) + 1
        if n_layers > have:
            raise MLAError(f"weights of {spec} are incomplete: its config has {n_layers} layers, the weights hold "
                           f"{have} (no tensor {layers[have - 1]}{have}.*)")
    elif n_layers > n_tensors:
        raise MLAError(f"weights of {spec} do not match its config: it has {n_layers} layers, the weights only "
                       f"{n_tensors} tensors")


def _local_tensors(source) -> tuple[dict[str, int], dict[str, tuple[int, ...]] | None, re.Pattern] | None:
    """``({name: number of values}, {name: shape} or None for a GGUF, layer-name pattern)`` of a local source's
    weight files; None when they are neither safetensors nor GGUF."""
    if source.gguf_file:
        return gguf_shapes(source.local, source.spec), None, _BLK
    shapes = safetensors_shapes(source.local, source.spec)
    if shapes is None:
        return None
    return {name: math.prod(shape) for name, shape in shapes.items()}, shapes, _LAYER


def _check_embedding(vocab, hidden, shapes: dict[str, tuple[int, ...]] | None, spec: str) -> None:
    """MLAError when the embedding's shape is not (vocab_size, hidden_size): the clearest sign of a foreign config."""
    name = EMBED
    if shapes and name in shapes and _positive_int(vocab) and _positive_int(hidden) and \
            shapes[name] != (vocab, hidden):
        raise MLAError(f"weights of {spec} do not match its config.json: {name} is {list(shapes[name])}, the config "
                       f"implies {[vocab, hidden]}")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None  # reported by the config loader, in its words


def _has_weights(source) -> bool:
    """Whether the local source has weight files to compare with (a config-only folder is reported later)."""
    if source.gguf_file:
        return True
    folder = source.local
    return (folder / "model.safetensors.index.json").is_file() or (folder / "model.safetensors").is_file()


def check_config_file(source) -> None:
    """Before the config is parsed (transformers' config classes build per-layer lists of ``num_hidden_layers``
    entries): MLAError when the local ``config.json``'s values are invalid or it claims more layers than the weight
    files hold."""
    local = source.local
    if local is None:
        return
    if source.gguf_file:
        try:
            n_layers, _ = _gguf_table(local, source.spec)
        except MLAError:
            return  # the config loader reports a corrupt GGUF in its own words
    else:
        raw = _read_json(local / "config.json")
        if not isinstance(raw, dict):
            return
        check_config(raw, source.spec)
        n_layers = _text_values(raw).get("num_hidden_layers")
    if not _positive_int(n_layers) or not _has_weights(source):
        return
    try:
        tensors = _local_tensors(source)
    except MLAError:
        if source.gguf_file:
            return  # the config loader reports a corrupt GGUF in its own words
        raise
    if tensors:
        counts, shapes, pattern = tensors
        if not source.gguf_file:
            values = _text_values(raw)
            _check_embedding(values.get("vocab_size"), values.get("hidden_size"), shapes, source.spec)
        _check_layer_count(_layers(_text_names(counts), pattern), len(counts), n_layers, source.spec)


# --- the weights against the config -----------------------------------------------------------------------------------


def _dims(config) -> dict:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = getattr(text, "hidden_size", None)
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (d // heads if d and heads else None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    return {"V": getattr(text, "vocab_size", None), "d": d, "L": getattr(text, "num_hidden_layers", None),
            "H": heads, "g": kv, "dh": head_dim, "I": getattr(text, "intermediate_size", None),
            "tied": bool(getattr(text, "tie_word_embeddings", False)), "model_type": getattr(text, "model_type", "")}


def _check_layers(found: set[int], n_layers: int | None, spec: str) -> None:
    if n_layers is None or not found:
        return
    extra = sorted(i for i in found if i >= n_layers)
    if extra:
        raise MLAError(f"weights of {spec} do not match its config: they have layer {extra[-1]}, the config "
                       f"{n_layers} layers")


def _least_values(c: dict) -> int | None:
    """Values a model of this config holds at the least (embedding, q and o projections, a gated MLP), for the
    families we convert and our exports; None when the config does not give all of it."""
    if not all(_positive_int(c[k]) for k in ("V", "d", "L", "H", "dh")):
        return None
    widths = c["I"] if isinstance(c["I"], list) else [c["I"]] * c["L"] if _positive_int(c["I"]) else None
    if widths is None:
        return None
    return c["V"] * c["d"] + c["L"] * 2 * c["H"] * c["dh"] * c["d"] + 3 * sum(widths) * c["d"]


def _check_size(c: dict, values: dict[str, int], spec: str) -> None:
    """MLAError when the config describes a larger model than the weight files hold."""
    least, held = _least_values(c), sum(values.values())
    if least is not None and least > held:
        raise MLAError(f"weights of {spec} do not match its config: it describes at least {least:,} values, the "
                       f"weight files hold {held:,}")


def check_weights(source, config) -> None:
    """MLAError unless the local weights of ``source`` exist, are complete on disk and fit ``config``.

    Hub ids are not checked here (transformers downloads and verifies them). Nothing here allocates or loops in
    proportion to a size the config claims before that size is compared with what the files hold.
    """
    check_config(config, source.spec)
    local = source.local
    if local is None:
        return
    c = _dims(config)
    try:
        layout = read_layout(config)
    except MLAError:  # not convertible: only what every causal LM has is checked
        layout = None
    # the full list of tensor names holds for the families with separate q/k/v and gate/up projections
    full = layout is not None and not (layout.fused_qkv or layout.fused_mlp or layout.text_of) and \
        all(c[k] for k in ("V", "d", "L", "H", "g", "dh"))
    tensors = _local_tensors(source)
    if tensors is None:
        return
    values, shapes, pattern = tensors
    layers = _layers(_text_names(values), pattern)
    _check_layers(set(layers), c["L"], source.spec)
    _check_embedding(c["V"], c["d"], shapes, source.spec)
    _check_layer_count(layers, len(values), c["L"], source.spec)  # before anything loops over the layers
    if layout is not None or c["model_type"] == MLA_MODEL_TYPE:
        _check_size(c, values, source.spec)
    if source.gguf_file:
        _check_gguf(c, values, full, source.spec)
    else:
        _check_safetensors(c, shapes, full, source.spec)


def _check_gguf(c: dict, counts: dict[str, int], full: bool, spec: str) -> None:
    want = gguf_expected_sizes(c) if full else {}
    for name, n in want.items():
        if name in counts and counts[name] != n:
            raise MLAError(f"weights of {spec} do not match its metadata: {name} has {counts[name]} "
                           f"values, the metadata implies {n}")
    missing = [n for n in want if n not in counts]
    if missing:
        raise MLAError(f"weights of {spec} are incomplete or do not match its metadata: no tensor "
                       f"{missing[0]} ({len(missing)} missing)")


def _check_safetensors(c: dict, shapes: dict[str, tuple[int, ...]], full: bool, spec: str) -> None:
    want = expected_shapes(c) if full else ({EMBED: (c["V"], c["d"])} if c["V"] and c["d"] else {})
    for name, shape in want.items():
        if name in shapes and shapes[name] != shape:
            raise MLAError(f"weights of {spec} do not match its config.json: {name} is {list(shapes[name])}, "
                           f"the config implies {list(shape)}")
    missing = [n for n in want if n not in shapes]
    if full and missing:
        raise MLAError(f"weights of {spec} are incomplete: {len(missing)} missing, e.g. {missing[0]}")
