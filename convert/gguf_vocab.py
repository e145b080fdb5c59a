"""The tokenizer of an export as llama.cpp's GGUF keys: vocab, scores or merges, special tokens, chat template.

Two kinds of ``tokenizer.json`` are written:

- byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen 2) as llama.cpp's ``gpt2`` model. llama.cpp splits text with the
  regexes of a named pre-tokenizer (``tokenizer.ggml.pre``) before BPE; it must be the one the export's
  ``tokenizer.json`` applies, or llama.cpp tokenizes other ids than transformers. ``pre_tokenizer`` recognises the
  layouts of the families we convert from the JSON itself; anything else is refused with a line that names
  ``--tokenizer-pre``.
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Phi-3, Gemma) as llama.cpp's ``llama`` model: the
  vocabulary with ``<0xXX>`` byte tokens, and a score per token. llama.cpp merges the adjacent pair whose joined text
  has the highest score, where transformers applies the merge of lowest rank, so a token's score is minus the rank of
  the first merge that makes it. Whether a ``▁`` is put before the text (``add_space_prefix``) is read from the
  normalizer / pre-tokenizer.
"""

import json
import logging
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


def _merge_pairs(spec: dict) -> list[tuple[str, str]]:
    """The BPE merges of a ``tokenizer.json`` as (left, right) pairs, in rank order (either spelling of the file)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"].get("merges", [])]


def _merges(spec: dict) -> list[str]:
    return [" ".join(pair) for pair in _merge_pairs(spec)]


SPACE = "\u2581"  # SentencePiece's visible space
_PREPEND = {"type": "Prepend", "prepend": SPACE}
_REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
_SPACE_SPLIT = {"type": "Split", "pattern": {"String": " "}}  # a no-op once spaces are replaced


def _steps(step: dict | None, key: str) -> list[dict]:
    if not step:
        return []
    return list(step.get(key, [])) if step.get("type") == "Sequence" else [step]


def _is(step: dict, shape: dict) -> bool:
    return all(step.get(k) == v for k, v in shape.items())


def _metaspace_prefix(step: dict) -> tuple[bool, str | None] | None:
    if step.get("type") != "Metaspace" or step.get("replacement") != SPACE or step.get("split", False):
        return None
    scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
    if scheme == "never":
        return False, None
    after = " and before text that follows a special token" if scheme == "first" else ""
    return True, (f"llama.cpp puts the {SPACE} prefix also before text that starts with a space{after}, where "
                  "transformers does not: the ids differ there")


def spm_space_prefix(spec: dict) -> tuple[bool, str | None] | None:
    """(``add_space_prefix``, a note where llama.cpp's prefix rule differs from transformers') for the layout of a
    SentencePiece-style ``tokenizer.json``, or None for a layout llama.cpp's ``llama`` tokenizer does not follow."""
    norm = _steps(spec.get("normalizer"), "normalizers")
    pre = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    if len(norm) == 2 and _is(norm[0], _PREPEND) and _is(norm[1], _REPLACE) and not pre:
        return True, None  # the original SentencePiece rule: a prefix on every text segment
    if len(norm) == 1 and _is(norm[0], _REPLACE) and all(_is(p, _SPACE_SPLIT) for p in pre):
        return False, None  # Gemma: spaces replaced, nothing prepended
    if not norm and len(pre) == 1:
        return _metaspace_prefix(pre[0])
    return None


def spm_scores(tokens: list[str], pairs: list[tuple[str, str]]) -> list[float]:
    """Minus the rank of the first merge that makes each token; tokens no merge makes score below every merge."""
    rank: dict[str, int] = {}
    for r, (left, right) in enumerate(pairs):
        rank.setdefault(left + right, r)
    floor = len(pairs)
    return [-float(rank.get(t, floor)) for t in tokens]


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


BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]  # SentencePiece's byte fallback, by byte value


def _byte_types(tokens: list[str], types: list[int], unk: int | None) -> list[int]:
    """SentencePiece's token types: ``<0xXX>`` byte tokens BYTE, the unknown token UNKNOWN."""
    byte = set(BYTE_TOKENS)
    out = [gguf.TokenType.BYTE if t in byte and k == gguf.TokenType.NORMAL else k for t, k in zip(tokens, types)]
    if unk is not None and unk < len(out):
        out[unk] = gguf.TokenType.UNKNOWN
    return out


def _check_bpe_model(model: dict, folder: Path) -> None:
    unsupported = [k for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges")
                   if model.get(k)]
    if model.get("type") != "BPE" or unsupported:
        what = f"a {model.get('type')} model" if model.get("type") != "BPE" else f"BPE with {', '.join(unsupported)}"
        raise MLAError(f"the tokenizer of {folder} is {what}: llama.cpp's tokenizers (byte-level BPE, SentencePiece-"
                       "style BPE with byte fallback) cannot reproduce it, so mla gguf does not write it")


def _add_byte_level(writer, spec: dict, tokenizer, vocab_size: int, folder: Path, pre: str | None) -> str:
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise MLAError(f"the tokenizer of {folder} is BPE without byte fallback or a byte-level decoder: llama.cpp "
                       "cannot reproduce it, so mla gguf does not write it")
    name = pre or pre_tokenizer(spec)
    if name is None:
        raise MLAError(f"the pre-tokenizer of {folder}/tokenizer.json is not one mla gguf recognises; name llama.cpp's "
                       "for it with --tokenizer-pre (e.g. llama-bpe, qwen2, gpt-2, smollm)")
    tokens, types = _tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    return f"byte-level BPE, pre-tokenizer {name}"


def _add_sentencepiece(writer, spec: dict, tokenizer, vocab_size: int, folder: Path, pre: str | None):
    layout = spm_space_prefix(spec)
    if pre is not None:
        raise MLAError(f"--tokenizer-pre names a byte-level BPE pre-tokenizer; the tokenizer of {folder} is "
                       "SentencePiece-style (byte fallback), written as llama.cpp's llama tokenizer without one")
    if layout is None:
        raise MLAError(f"the normalizer / pre-tokenizer of {folder}/tokenizer.json is not a SentencePiece layout "
                       f"llama.cpp follows ({SPACE} for spaces, with or without a {SPACE} prefix): mla gguf does not "
                       "write it")
    vocab = tokenizer.get_vocab()
    missing = [t for t in BYTE_TOKENS if t not in vocab]
    if missing:
        raise MLAError(f"the byte-fallback tokenizer of {folder} lacks {len(missing)} of the 256 <0xXX> byte tokens "
                       f"(first {missing[0]}), which llama.cpp needs")
    tokens, types = _tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(spm_scores(tokens, _merge_pairs(spec)))
    writer.add_token_types(_byte_types(tokens, types, tokenizer.unk_token_id))
    writer.add_add_space_prefix(layout[0])
    return f"SentencePiece-style BPE, {SPACE} prefix {'on' if layout[0] else 'off'}", layout[1]


def _load_tokenizer(folder: Path):
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - a corrupt tokenizer.json raises many types (tokenizers' own Exception)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise MLAError(f"could not load the tokenizer of {folder}: {first}") from None


def _add_special(writer, folder: Path, tokenizer, vocab_size: int, merges: list[str]) -> None:
    quiet = logging.getLogger("gguf.vocab")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its guesses at add_bos/add_eos from the post-processor are replaced by _adds
    try:
        special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    finally:
        quiet.setLevel(level)
    special.merges = merges
    special.add_special_token["bos"], special.add_special_token["eos"] = _adds(tokenizer)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def add_tokenizer(writer, folder: Path, vocab_size: int, pre: str | None = None) -> tuple[str, str | None]:
    """Write the tokenizer of the export ``folder`` into ``writer`` (a ``gguf.GGUFWriter``); returns what was written
    (kind and pre-tokenizer or prefix rule) and a note where llama.cpp's ids can differ from transformers', else None.
    MLAError for a tokenizer llama.cpp cannot reproduce."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise MLAError(f"{folder} has no tokenizer.json: mla gguf writes the tokenizer from it")
    spec = read_json_object(path)
    model = spec.get("model")
    if not isinstance(model, dict) or not isinstance(spec.get("decoder") or {}, dict):
        raise MLAError(f"{path} has no tokenizer model object")
    _check_bpe_model(model, folder)
    tokenizer = _load_tokenizer(folder)
    if len(tokenizer) > vocab_size:
        raise MLAError(f"the tokenizer of {folder} has {len(tokenizer)} tokens, more than the model's {vocab_size}")
    if model.get("byte_fallback"):
        kind, note = _add_sentencepiece(writer, spec, tokenizer, vocab_size, folder, pre)
        merges = []  # llama.cpp's llama tokenizer merges by score
    else:
        kind, note = _add_byte_level(writer, spec, tokenizer, vocab_size, folder, pre), None
        merges = _merges(spec)
    _add_special(writer, folder, tokenizer, vocab_size, merges)
    return kind, note
