"""llama.cpp (the pinned release, built once from source and cached: ``eval/llama_cpp.py``) runs ``mla gguf`` files
of deepseek_v3 exports: the perplexity llama-perplexity prints equals transformers' on the same token ids (its
protocol replayed in ``eval/llama_run.py``), llama.cpp tokenizes text into transformers' ids, and its KV cache holds
only ``kv_lora_rank + qk_rope_head_dim`` f16 values per token and layer.

The tiny sources get a final norm gain of 10, so their next-token distributions are far from uniform and the
perplexity moves with any wrong weight, layout or scale (a random tiny model's is near the vocabulary size)."""

import json
import math
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import VOCAB, _tokenizer, assert_error, convert_tiny, make_tiny, run_main
from convert.errors import MLAError
from convert.gguf_export import write_gguf

pytestmark = pytest.mark.slow

PPL_TOL = 1e-3  # relative, float32 GGUF against transformers' float32 (the issue's 0.1%)
CTX = 64
CHUNKS = 48  # of the text's ~200: 3072 tokens, 1536 scored


@pytest.fixture(scope="module")
def tools():
    from eval import llama_cpp

    try:
        return llama_cpp.build()
    except MLAError as err:
        if "needs cmake" in str(err) or "needs c++" in str(err):
            pytest.skip(str(err))
        raise


def _sharp_source(folder: Path, name: str, **config) -> Path:
    make_tiny(folder, name, **config)
    path = folder / "model.safetensors"
    state = load_file(path)
    state["model.norm.weight"] = state["model.norm.weight"] * 10.0
    save_file(state, path, metadata={"format": "pt"})
    return folder


# name: (tiny family, conversion settings, source config)
EXPORTS = {
    "mha": ("llama-mha", {"kv_budget": 0.3125}, {}),
    "gqa": ("llama-gqa", {"kv_budget": 0.3125}, {}),
    "mqa": ("llama-mqa", {"kv_budget": 0.5}, {}),
    "gqa-untied": ("llama-gqa", {"kv_budget": 0.3125}, {"tie_word_embeddings": False}),
    "mha-0.5": ("llama-mha", {"kv_budget": 0.5}, {}),  # 56 + 8
    "gqa-blocked": ("llama-gqa", {"kv_budget": 0.3125, "width_block": 16}, {}),  # 16 values: 8 + 8
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("ggufexp")
    out = {}
    for name, (family, settings, config) in EXPORTS.items():
        src = _sharp_source(root / f"src-{name}", family, **config)
        convert_tiny(src, root / name, format="deepseek_v3", **settings)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    import pydoc_data.topics

    from eval.llama_run import write_text_file

    body = "\n\n".join(list(pydoc_data.topics.topics.values())[40:44])  # not the tokenizer's training text
    return write_text_file(tmp_path_factory.mktemp("text") / "text.txt", body)


def _gguf(exports, name, outtype="f32") -> Path:
    out = exports[name].parent / f"{name}-{outtype}.gguf"
    if not out.exists():
        write_gguf(exports[name], out, outtype)
    return out


def _reference(folder: Path, tokens: list[int]) -> float:
    from eval.llama_run import reference_perplexity

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # stock DeepseekV3ForCausalLM
    return reference_perplexity(model, tokens, CTX, None, CHUNKS)


@pytest.mark.parametrize("name", list(EXPORTS))
def test_llama_perplexity_equals_transformers_on_the_same_tokens(tools, exports, text, name):
    from eval.llama_run import perplexity, tokenize

    path = _gguf(exports, name)
    tokens = tokenize(path, text)
    ref = _reference(exports[name], tokens)
    assert abs(math.log(ref / VOCAB)) > 0.5, ref  # far from uniform: the comparison can see a wrong logit
    for fa in ("0", "1"):  # both attention paths of llama.cpp's deepseek2 graph
        got = perplexity(path, text, CTX, 2, "-fa", fa, "--chunks", CHUNKS)["ppl"]
        assert abs(got / ref - 1) < PPL_TOL, (fa, got, ref)


def test_llama_cpp_tokenizes_as_transformers_does(tools, exports, text):
    from eval.llama_run import tokenize

    path = _gguf(exports, "gqa")
    hf = AutoTokenizer.from_pretrained(exports["gqa"])(text.read_bytes().decode(), add_special_tokens=True)["input_ids"]
    assert tokenize(path, text) == hf


def _pre_tokenizers():
    from tokenizers import Regex, pre_tokenizers as pt

    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
    qwen2 = llama3.replace(r"\p{N}{1,3}", r"\p{N}")

    def split(pattern):
        return pt.Sequence([pt.Split(Regex(pattern), behavior="isolated", invert=False),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])

    return {"gpt-2": pt.ByteLevel(add_prefix_space=False),
            "smollm": pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
            "llama-bpe": split(llama3), "qwen2": split(qwen2)}


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_each_recognised_pre_tokenizer_splits_as_transformers(tools, exports, tmp_path, pre):
    """A tokenizer trained with each pre-tokenizer mla gguf names: llama.cpp's ids equal transformers' on text with
    numbers, contractions, runs of spaces and newlines (where the four splits differ)."""
    from eval.llama_run import tokenize, write_text_file

    folder = tmp_path / "export"
    shutil.copytree(exports["gqa"], folder)
    _tokenizer(folder, _pre_tokenizers()[pre])
    path = tmp_path / "model.gguf"
    write_gguf(folder, path, "f32")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
    sample = ("In 2004, 1234567 users didn't say \"it's 3.14159\";   they'd   write:\n\n  x = 42\t# and\r\n"
              "THE END. It's 99 bottles... we'll see 10,000+ more!\n")
    txt = write_text_file(tmp_path / "sample.txt", sample * 3)
    hf = AutoTokenizer.from_pretrained(folder)(txt.read_bytes().decode(), add_special_tokens=True)["input_ids"]
    assert tokenize(path, txt) == hf


def _vocab_file(name: str) -> Path:
    """A real vocabulary shipped in the pinned llama.cpp source (``models/ggml-vocab-NAME.gguf``) with its test texts
    (``.inp``) and the ids the original transformers tokenizer gave them (``.out``)."""
    from eval import llama_cpp

    path = llama_cpp.root() / "src" / "models" / f"ggml-vocab-{name}.gguf"
    assert path.is_file(), path
    return path


def _vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    path = _vocab_file(name)
    texts = Path(f"{path}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = Path(f"{path}.out").read_text(encoding="utf-8").split("\n")
    return [(t, [int(x) for x in i.split()]) for t, i in zip(texts, ids)]


def _gguf_strings(path: Path, key: str) -> list[str]:
    field = gguf.GGUFReader(path).fields[key]
    return [bytes(field.parts[i]).decode() for i in field.data]


@pytest.fixture(scope="module")
def spm_export(tools, tmp_path_factory):
    """A deepseek_v3 export of a tiny Llama whose 32,064 ids are Phi-3's (Llama 2's 32,000 plus chat tokens)."""
    root = tmp_path_factory.mktemp("spm")
    make_tiny(root / "src", "llama-gqa", vocab_size=32064)
    AutoTokenizer.from_pretrained(_vocab_file("phi-3").parent, gguf_file="ggml-vocab-phi-3.gguf").save_pretrained(
        root / "src")
    convert_tiny(root / "src", root / "export", format="deepseek_v3", kv_budget=0.3125)
    return root / "export"


def _with_tokenizer(export: Path, folder: Path, vocab: str, layout: dict | None = None) -> Path:
    """A copy of ``export`` with the tokenizer transformers reads from llama.cpp's ``vocab`` file; ``layout``
    replaces normalizer / pre-tokenizer in its tokenizer.json."""
    shutil.copytree(export, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    path = _vocab_file(vocab)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)
    if layout:
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        (folder / "tokenizer.json").write_text(json.dumps({**spec, **layout}), encoding="utf-8")
    return folder


_SPACE_TO_MARK = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
_METASPACE = {"type": "Metaspace", "replacement": "\u2581", "split": False}
# layout: (vocab, tokenizer.json changes, add_space_prefix, transformers' ids differ on text that starts with a space)
SPM_LAYOUTS = {
    "prepend-normalizer": ("phi-3", None, True, False),  # Llama 2's original tokenizer.json
    "metaspace-first": ("llama-spm", None, True, True),  # transformers 5 writes Llama 2 so
    "metaspace-always": ("llama-spm", {"normalizer": None, "pre_tokenizer": {**_METASPACE, "prepend_scheme": "always"}},
                         True, True),
    "replace-only": ("llama-spm", {"normalizer": _SPACE_TO_MARK, "pre_tokenizer": {  # Gemma's: no prefix
        "type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}}, False, False),
}


@pytest.mark.parametrize("layout", list(SPM_LAYOUTS))
def test_sentencepiece_tokenizers_tokenize_as_transformers_and_the_original(tools, spm_export, tmp_path, layout):
    """Real SentencePiece vocabularies (Llama 2's, Phi-3's) in each layout transformers writes them: llama.cpp's ids
    equal transformers' on llama.cpp's own tokenizer test texts, and where the prefix rule is SentencePiece's, the ids
    the original tokenizer gave (recorded in llama.cpp's ``.out`` files). Where transformers' Metaspace skips the
    prefix before a leading space, the ids differ on those texts only, as ``mla gguf`` notes."""
    from eval.llama_run import tokenize, write_text_file

    vocab, changes, prefix, leading_space_differs = SPM_LAYOUTS[layout]
    folder = _with_tokenizer(spm_export, tmp_path / "export", vocab, changes)
    path = tmp_path / "model.gguf"
    info = write_gguf(folder, path, "f32")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert bool(fields["tokenizer.ggml.add_space_prefix"].contents()) is prefix
    assert (info["tokenizer_note"] is not None) is leading_space_differs
    hf = AutoTokenizer.from_pretrained(folder)
    checked = 0
    for i, (text, original) in enumerate(_vocab_cases(vocab)):
        got = tokenize(path, write_text_file(tmp_path / f"{i}.txt", text))
        assert got[0] == hf.bos_token_id
        if prefix:  # SentencePiece's own rule: the ids of the original tokenizer
            assert got[1:] == original, text
        if not (leading_space_differs and text[:1].isspace()):
            assert got == hf(text, add_special_tokens=True)["input_ids"], text
            checked += 1
    assert checked >= 20  # of 47 texts, 22 start with whitespace


def test_sentencepiece_scores_rank_merges_as_the_original_scores_do():
    """A token's score is minus the rank of the first merge that makes it: over Llama 2's vocabulary, the order of
    these scores is the order of the original SentencePiece scores (kept in llama.cpp's vocab file), for every token a
    merge makes (the ones llama.cpp's tokenizer compares)."""
    import numpy as np

    from convert.gguf_vocab import _merge_pairs, spm_scores

    path = _vocab_file("llama-spm")
    tokens = _gguf_strings(path, "tokenizer.ggml.tokens")
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.scores"]
    original = np.array([float(field.parts[i][0]) for i in field.data])
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    pairs = _merge_pairs(json.loads(tokenizer.backend_tokenizer.to_str()))
    ours = np.array(spm_scores(tokens, pairs))
    made = np.flatnonzero(ours > -len(pairs))
    assert len(made) > 0.9 * len(tokens)
    order = made[np.argsort(-ours[made], kind="stable")]
    assert np.all(np.diff(original[order]) <= 0)
    assert np.all(ours[np.setdiff1d(np.arange(len(tokens)), made)] < ours[made].min())


def test_sentencepiece_token_types_mark_bytes_and_specials(tools, spm_export):
    path = spm_export.parent / "spm-f32.gguf"
    write_gguf(spm_export, path, "f32")
    tokens = _gguf_strings(path, "tokenizer.ggml.tokens")
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.token_type"]
    types = dict(zip(tokens, (int(field.parts[i][0]) for i in field.data)))
    T = gguf.TokenType
    assert [types[f"<0x{b:02X}>"] for b in range(256)] == [T.BYTE] * 256
    assert (types["<unk>"], types["<s>"], types["<|endoftext|>"], types["\u2581the"]) == (
        T.UNKNOWN, T.CONTROL, T.CONTROL, T.NORMAL)


def test_tokenizers_llama_cpp_cannot_reproduce_are_one_line_and_no_file(spm_export, exports, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    folder = _with_tokenizer(spm_export, tmp_path / "export", "llama-spm")
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))

    def refused(changes: dict, *words, export=folder, extra=()):
        (folder / "tokenizer.json").write_text(json.dumps({**spec, **changes}), encoding="utf-8")
        code, err = run_main(capsys, "gguf", export, out, *extra)
        assert_error(code, err, out, *words)

    refused({"pre_tokenizer": {**_METASPACE, "prepend_scheme": "first", "split": True}}, "SentencePiece layout")
    refused({"normalizer": {"type": "NFKC"}, "pre_tokenizer": None}, "SentencePiece layout")
    refused({"model": {**spec["model"], "dropout": 0.1}}, "dropout")
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if t != "<0x41>"}
    refused({"model": {**spec["model"], "vocab": vocab}}, "lacks 1 of the 256", "<0x41>")
    merges = list(spec["model"]["merges"])
    merges[5] = 7  # not a merge: tokenizers itself refuses the file
    refused({"model": {**spec["model"], "merges": merges}}, "could not load the tokenizer")
    refused({}, "--tokenizer-pre", "SentencePiece", extra=("--tokenizer-pre", "llama-bpe"))
    small = _with_tokenizer(exports["gqa"], tmp_path / "small", "phi-3")  # 32,064 ids for a model of VOCAB
    refused({}, "32064 tokens", f"model's {VOCAB}", export=small)


def test_kv_cache_holds_only_the_latent_and_the_rope_key(tools, exports, text):
    from eval.llama_run import perplexity

    for name in ("mha", "gqa", "mqa"):
        ds = AutoModelForCausalLM.from_pretrained(exports[name]).config
        width = ds.kv_lora_rank + ds.qk_rope_head_dim
        got = perplexity(_gguf(exports, name), text, CTX, 2, "-b", 4096, "--chunks", CHUNKS)  # 64 sequences
        assert (got["k_width"], got["v_width"], got["k_type"]) == (width, 0, "f16")  # one K row per token, no V
        per_token = width * ds.num_hidden_layers * 2  # bytes
        assert got["k_mib"] == pytest.approx(got["cells"] * got["seqs"] * per_token / 2**20, abs=0.006)
        assert got["v_mib"] == 0.0


def test_tied_head_is_tied_again_and_an_untied_one_is_kept(exports):
    def names(path):
        return {t.name for t in gguf.GGUFReader(path).tensors}

    tied, untied = names(_gguf(exports, "gqa")), names(_gguf(exports, "gqa-untied"))
    assert "output.weight" not in tied and "output.weight" in untied
    assert tied == untied - {"output.weight"}


def test_q8_0_quantizes_rows_in_blocks_of_32_and_keeps_the_perplexity(tools, exports, text):
    from eval.llama_run import perplexity

    path = _gguf(exports, "mha-0.5", "q8_0")
    Q = gguf.GGMLQuantizationType
    for t in gguf.GGUFReader(path).tensors:
        ne0 = int(t.shape[0])  # ggml order: the row length first
        want = Q.F32 if t.name.endswith("norm.weight") else (Q.Q8_0 if ne0 % 32 == 0 else Q.F16)
        assert t.tensor_type == want, t.name
    # --no-repack: llama.cpp's AMX int8 kernels crash (SIGSEGV / SIGILL) on CPUs that list AMX in a VM that does not
    # enable it, for any Q8_0 model (the original's too); the plain CPU kernels run the same file
    f32 = perplexity(_gguf(exports, "mha-0.5"), text, CTX, 2, "-nr", "--chunks", CHUNKS)["ppl"]
    q8 = perplexity(path, text, CTX, 2, "-nr", "--chunks", CHUNKS)["ppl"]
    assert abs(q8 / f32 - 1) < 0.01


def test_what_llama_cpp_cannot_run_is_one_line_and_no_file(exports, lossless, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    code, err = run_main(capsys, "gguf", lossless["llama-gqa"], out)  # our own format: per-layer widths, no latent norm
    assert_error(code, err, out, "--format deepseek_v3", "latent norm", "padded to one width")
    (tmp_path / "empty").mkdir()
    code, err = run_main(capsys, "gguf", tmp_path / "empty", out)
    assert_error(code, err, out, "config.json")
    code, err = run_main(capsys, "gguf", exports["gqa"], exports["gqa"] / "m.gguf")  # into the export: alters an input
    assert_error(code, err, exports["gqa"] / "m.gguf", "input")
    moe = tmp_path / "moe"  # a DeepSeek-V3 with expert layers: not one of our dense exports
    shutil.copytree(exports["gqa"], moe)
    raw = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**raw, "first_k_dense_replace": 1}))
    code, err = run_main(capsys, "gguf", moe, out)
    assert_error(code, err, out, "mixture-of-experts")
    (moe / "config.json").write_text("[1, 2]")
    code, err = run_main(capsys, "gguf", moe, out)
    assert_error(code, err, out, "not a JSON object")
    (moe / "config.json").write_text(json.dumps(raw))
    (moe / "tokenizer.json").write_text('{"model": ')  # truncated
    code, err = run_main(capsys, "gguf", moe, out)
    assert_error(code, err, out, "tokenizer.json")
    out.write_bytes(b"x")
    code, err = run_main(capsys, "gguf", exports["gqa"], out)
    assert_error(code, err, out, "--overwrite", out_exists=True)
    assert out.read_bytes() == b"x"


def test_an_interrupted_write_leaves_nothing(exports, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, raised as an exception by the CLI) while tensors stream out: no OUT, no temporary file."""
    from conftest import leftovers
    from convert import gguf_export

    calls = []

    def interrupted(t, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(t, qtype)

    real = gguf_export.encode
    monkeypatch.setattr(gguf_export, "encode", interrupted)
    out = tmp_path / "m.gguf"
    with pytest.raises(KeyboardInterrupt):
        write_gguf(exports["gqa"], out, "f16")
    assert not out.exists() and leftovers(out) == [] and len(calls) == 5


@pytest.mark.network
def test_the_export_tokenizer_loads_in_the_transformers_llama_cpp_converter_pins(exports, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py pins transformers 4.57.6, which knows no ``TokenizersBackend``: the
    export names ``PreTrainedTokenizerFast``, and 4.57 tokenizes as the running transformers does."""
    import subprocess

    from conftest import fresh_venv

    python = fresh_venv("4.57.6")
    sample = "In 2004, 1234567 users didn't say \"it's 3.14\";\n  x = 42 # end"
    code = ("import json, sys; from transformers import AutoTokenizer; "
            "t = AutoTokenizer.from_pretrained(sys.argv[1]); print(json.dumps(t(sys.argv[2])['input_ids']))")
    done = subprocess.run([python, "-c", code, str(exports["gqa"]), sample], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    want = AutoTokenizer.from_pretrained(exports["gqa"])(sample)["input_ids"]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == want


@pytest.mark.parametrize("patch", sorted(p.stem for p in (Path(__file__).parents[1] / "docs" / "llama-cpp-patches")
                                         .glob("*.patch")))
def test_each_engine_experiment_patch_applies_to_the_pinned_source(tools, tmp_path, patch):
    """The patches kept in docs/ (experiments, never shipped) still apply to the release the tests build."""
    import subprocess

    from eval import llama_cpp

    src, path = llama_cpp.root() / "src", llama_cpp.patch_file(patch)
    touched = [ln[6:].strip() for ln in path.read_text().splitlines() if ln.startswith("+++ b/")]
    assert touched
    for rel in touched:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, tmp_path / rel)
    done = subprocess.run(["patch", "-p1", "--forward", "--dry-run", "-d", str(tmp_path), "-i", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
