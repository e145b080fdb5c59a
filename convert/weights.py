"""Check a model's weight files against its config before anything is allocated.

Only headers are read: the JSON header of each safetensors file, the tensor table of a GGUF file. A missing or
truncated shard, a GGUF with no tensors, a tensor whose shape differs from what ``config.json`` implies, or layers the
config does not have is a one-line MLAError, so a wrong config can never make the loader allocate a model (say a
default 7B one) that the files do not hold.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import MLAError

MAX_HEADER = 100 * 2**20  # a safetensors JSON header larger than this is corrupt
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_BLK = re.compile(r"^blk\.(\d+)\.")


def safetensors_header(path: Path, spec: str) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """{name: (dtype, shape, absolute byte offset)} of one safetensors file; MLAError if its header is corrupt or its
    data is cut short."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n < 2 or n > min(MAX_HEADER, size - 8):
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        entries, end = {}, 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            entries[name] = (str(info["dtype"]), tuple(int(x) for x in info["shape"]), 8 + n + int(info["data_offsets"][0]))
            end = max(end, int(info["data_offsets"][1]))
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        raise MLAError(f"could not load the weights of {spec}: {path.name} is not a readable safetensors file") from None
    if 8 + n + end > size:
        raise MLAError(f"could not load the weights of {spec}: {path.name} is truncated ({size} bytes, its header "
                       f"needs {8 + n + end})")
    return entries


def safetensors_files(folder: Path, spec: str) -> list[str] | None:
    """The safetensors files of ``folder`` (shards listed by the index, all present), or None when it holds only
    other weight formats; MLAError when a listed shard is missing or there are no weights."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            raise MLAError(f"could not load the weights of {spec}: {index.name} is not a valid index") from None
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


def gguf_shapes(path: Path, spec: str) -> dict[str, int]:
    """{name: number of elements} of a GGUF file's tensors; MLAError when unreadable or empty."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        tensors = {t.name: int(t.n_elements) for t in reader.tensors}
    except Exception as err:  # noqa: BLE001 - a corrupt GGUF raises many types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise MLAError(f"could not load the weights of {spec}: {first}") from None
    if not tensors:
        raise MLAError(f"could not load the weights of {spec}: the GGUF file has metadata but no tensors")
    return tensors


def _dims(config) -> dict:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = getattr(text, "hidden_size", None)
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (d // heads if d and heads else None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    return {"V": getattr(text, "vocab_size", None), "d": d, "L": getattr(text, "num_hidden_layers", None),
            "H": heads, "g": kv, "dh": head_dim, "I": getattr(text, "intermediate_size", None),
            "tied": bool(getattr(text, "tie_word_embeddings", False)), "model_type": getattr(text, "model_type", "")}


def _expected(c: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor shapes every supported family (llama, mistral, qwen2) has, implied by the config."""
    want = {"model.embed_tokens.weight": (c["V"], c["d"])}
    if not c["tied"]:
        want["lm_head.weight"] = (c["V"], c["d"])
    for i in range(c["L"]):
        p = f"model.layers.{i}."
        want[p + "self_attn.q_proj.weight"] = (c["H"] * c["dh"], c["d"])
        want[p + "self_attn.k_proj.weight"] = (c["g"] * c["dh"], c["d"])
        want[p + "self_attn.v_proj.weight"] = (c["g"] * c["dh"], c["d"])
        want[p + "self_attn.o_proj.weight"] = (c["d"], c["H"] * c["dh"])
        if c["I"]:
            want[p + "mlp.gate_proj.weight"] = (c["I"], c["d"])
            want[p + "mlp.down_proj.weight"] = (c["d"], c["I"])
    return want


def _gguf_expected(c: dict) -> dict[str, int]:
    want = {"token_embd.weight": c["V"] * c["d"]}
    for i in range(c["L"]):
        want[f"blk.{i}.attn_q.weight"] = c["H"] * c["dh"] * c["d"]
        want[f"blk.{i}.attn_k.weight"] = c["g"] * c["dh"] * c["d"]
        want[f"blk.{i}.attn_v.weight"] = c["g"] * c["dh"] * c["d"]
    return want


def _check_layers(found: set[int], n_layers: int | None, spec: str) -> None:
    if n_layers is None or not found:
        return
    extra = sorted(i for i in found if i >= n_layers)
    if extra:
        raise MLAError(f"weights of {spec} do not match its config: they have layer {extra[-1]}, the config "
                       f"{n_layers} layers")


def check_weights(source, config) -> None:
    """MLAError unless the local weights of ``source`` exist, are complete on disk and fit ``config``.

    Hub ids are not checked here (transformers downloads and verifies them).
    """
    from .adapters import read_layout

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
    if source.gguf_file:
        counts = gguf_shapes(local, source.spec)
        _check_layers({int(m.group(1)) for n in counts if (m := _BLK.match(n))}, c["L"], source.spec)
        want = _gguf_expected(c) if full else {}
        for name, n in want.items():
            if name in counts and counts[name] != n:
                raise MLAError(f"weights of {source.spec} do not match its metadata: {name} has {counts[name]} "
                               f"values, the metadata implies {n}")
        missing = [n for n in want if n not in counts]
        if missing:
            raise MLAError(f"weights of {source.spec} are incomplete or do not match its metadata: no tensor "
                           f"{missing[0]} ({len(missing)} missing)")
        return
    shapes = safetensors_shapes(local, source.spec)
    if shapes is None:
        return
    text = [n for n in shapes if "language_model" in n] if layout is not None and layout.text_of else list(shapes)
    _check_layers({int(m.group(1)) for n in text if (m := _LAYER.search(n))}, c["L"], source.spec)
    want = _expected(c) if full else ({"model.embed_tokens.weight": (c["V"], c["d"])} if c["V"] and c["d"] else {})
    for name, shape in want.items():
        if name in shapes and shapes[name] != shape:
            raise MLAError(f"weights of {source.spec} do not match its config.json: {name} is {list(shapes[name])}, "
                           f"the config implies {list(shape)}")
    missing = [n for n in want if n not in shapes]
    if full and missing:
        raise MLAError(f"weights of {source.spec} are incomplete: {len(missing)} missing, e.g. {missing[0]}")
