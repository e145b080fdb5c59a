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
