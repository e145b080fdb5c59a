"""The tokenizer of an export as llama.cpp's GGUF keys: byte-level BPE vocab, merges, special tokens, chat template.

llama.cpp splits text with the regexes of a named pre-tokenizer (``tokenizer.ggml.pre``) before BPE; it must be the
one the export's ``tokenizer.json`` applies, or llama.cpp tokenizes other ids than transformers. ``pre_tokenizer``
recognises the layouts of the families we convert (GPT-2 byte-level, SmolLM's single digits, Llama 3, Qwen 2) from
the JSON itself; anything else is refused with a line that names ``--tokenizer-pre``.
"""

import json
from pathlib import Path

import gguf
from transformers import AutoTokenizer

from .errors import MLAError

# Split regexes as tokenizer.json spells them -> llama.cpp's pre-tokenizer name.
_SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


MAX_JSON = 256 * 2**20  # config.json / tokenizer.json larger than this are refused, not read


def read_json_object(path: Path) -> dict:
    """A JSON object file of at most MAX_JSON bytes, or MLAError naming what is wrong with it."""
    try:
        if path.stat().st_size > MAX_JSON:
            raise MLAError(f"{path} is larger than {MAX_JSON // 2**20} MiB: not a config or tokenizer file")
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise MLAError(f"cannot read {path}: {err}") from None
    if not isinstance(value, dict):
        raise MLAError(f"{path} is not a JSON object")
    return value


def _parts(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer(spec: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE ``tokenizer.json`` (parsed), or None if not recognised."""
    parts = _parts(spec.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if len(byte_level) != 1 or byte_level[0].get("add_prefix_space", False):
        return None
    regex = byte_level[0].get("use_regex", True)
    if kinds == ["ByteLevel"] and regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and regex and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not regex and parts[0].get("behavior") == "Isolated":
        return _SPLIT_PATTERNS.get(parts[0].get("pattern", {}).get("Regex"))
    return None


def _merges(spec: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def _tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and GGUF token types by id, padded to ``vocab_size`` with unused placeholders."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _adds(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS to a text by itself (measured, as transformers does it)."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id is not None and len(ids) > 1 and ids[0] == tokenizer.bos_token_id
    eos = tokenizer.eos_token_id is not None and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id
    return bos, eos


def add_tokenizer(writer, folder: Path, vocab_size: int, pre: str | None = None) -> str:
    """Write the tokenizer of the export ``folder`` into ``writer`` (a ``gguf.GGUFWriter``); returns the
    pre-tokenizer name used. MLAError for a tokenizer llama.cpp's BPE cannot reproduce."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise MLAError(f"{folder} has no tokenizer.json: mla gguf writes byte-level BPE tokenizers from it")
    spec = read_json_object(path)
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if not isinstance(model, dict) or not isinstance(decoder, dict) or model.get("type") != "BPE" or \
            model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise MLAError(f"the tokenizer of {folder} is not byte-level BPE ({model.get('type')}, SentencePiece-style "
                       "byte fallback or another decoder): mla gguf does not write it yet")
    name = pre or pre_tokenizer(spec)
    if name is None:
        raise MLAError(f"the pre-tokenizer of {folder}/tokenizer.json is not one mla gguf recognises; name llama.cpp's "
                       "for it with --tokenizer-pre (e.g. llama-bpe, qwen2, gpt-2, smollm)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise MLAError(f"could not load the tokenizer of {folder}: {err}") from None
    tokens, types = _tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    special.merges = _merges(spec)
    special.add_special_token["bos"], special.add_special_token["eos"] = _adds(tokenizer)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    return name
