"""Bad inputs: one clear ``error: ...`` line on stderr, exit 2, no traceback, and never a partial OUT."""

import importlib.util
import json
import random
import shutil
import subprocess
import sys

import pytest

from conftest import FAST, assert_error, leftovers, run_main

pytestmark = pytest.mark.usefixtures("_no_progress_output")  # conftest: no progress bars in stderr


@pytest.fixture
def src(tiny_models):
    return tiny_models["llama-gqa"]


def run(capsys, src, out, *flags):
    """``mla convert SRC OUT --fast-settings FLAGS`` in-process: (exit code, stderr)."""
    return run_main(capsys, "convert", src, out, *FAST, *flags)


# --- bad SRC --------------------------------------------------------------------------------------------------------


def _garbage(n, seed=0):
    return random.Random(seed).randbytes(n)


def _model_copy(tmp, src):
    return shutil.copytree(src, tmp / "model")


def _halve(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _weights(tmp, src, edit):
    folder = _model_copy(tmp, src)
    edit(folder / "model.safetensors")
    return folder


def _drop_tensor(path, name="model.layers.0.self_attn.k_proj.weight"):
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    del state[name]
    save_file(state, path, metadata={"format": "pt"})


def _set_model_type(tmp, src, model_type, **extra):
    folder = _model_copy(tmp, src)
    cfg = folder / "config.json"
    cfg.write_text(cfg.read_text().replace('"model_type": "llama"', f'"model_type": "{model_type}"'))
    if extra:
        data = json.loads(cfg.read_text())
        data.update(extra)
        cfg.write_text(json.dumps(data))
    return folder


def _config_only(tmp, model_type, **kwargs):
    """A folder with only the config.json of a tiny ``model_type`` (refused before any weight is read)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **kwargs)
    config.save_pretrained(tmp / model_type)
    return tmp / model_type


def _small_vocab(tmp):
    """A model of vocabulary 200 with a tokenizer of 320 tokens (ids past the embedding table)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import _tokenizer

    config = AutoConfig.for_model("llama", **{**_TINY_TEXT, "vocab_size": 200})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "small-vocab")
    _tokenizer(tmp / "small-vocab")
    return tmp / "small-vocab"


_TINY_TEXT = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)


def _file(path, data):
    path.write_bytes(data)
    return path


BAD_SOURCES = {
    "missing-path": (lambda tmp, src: tmp / "no-such-model", ["not found"]),
    "folder-without-config": (lambda tmp, src: (tmp / "empty").mkdir() or tmp / "empty", ["config.json"]),
    "plain-file": (lambda tmp, src: _file(tmp / "model.bin", b"hello"), ["neither a model folder nor a .gguf"]),
    "gguf-missing": (lambda tmp, src: tmp / "nope.gguf", ["gguf file not found"]),
    "gguf-garbage": (lambda tmp, src: _file(tmp / "bad.gguf", _garbage(4096)), ["could not read", "gguf"]),
    "gguf-truncated-header": (lambda tmp, src: _file(tmp / "bad.gguf", b"GGUF\x03\x00\x00\x00garbage"),
                              ["could not read the config"]),
    "config-not-json": (lambda tmp, src: _file(_model_copy(tmp, src) / "config.json", b"{not json").parent,
                        ["could not read the config"]),
    "weights-missing": (lambda tmp, src: _weights(tmp, src, lambda p: p.unlink()), ["weights", "model.safetensors"]),
    "weights-garbage": (lambda tmp, src: _weights(tmp, src, lambda p: p.write_bytes(_garbage(p.stat().st_size))),
                        ["could not load the weights"]),
    "weights-truncated": (lambda tmp, src: _weights(tmp, src, _halve), ["could not load the weights"]),
    "weights-tensor-missing": (lambda tmp, src: _weights(tmp, src, _drop_tensor),
                               ["incomplete", "model.layers.0.self_attn.k_proj.weight"]),
    "model-type-unsupported": (lambda tmp, src: _set_model_type(tmp, src, "gpt2"), ["unsupported", "gpt2"]),
    "model-type-unknown": (lambda tmp, src: _set_model_type(tmp, src, "not_a_model"), ["not_a_model"]),
    "model-type-moe": (lambda tmp, src: _config_only(tmp, "qwen3_moe", **_TINY_TEXT),
                       ["unsupported", "qwen3_moe", "mixture-of-experts"]),
    "moe-layers-in-a-dense-family": (lambda tmp, src: _set_model_type(tmp, src, "llama", num_local_experts=8),
                                     ["unsupported", "mixture-of-experts", "num_local_experts"]),
    "tokenizer-beyond-vocabulary": (lambda tmp, src: _small_vocab(tmp), ["tokenizer", "vocabulary (200)"]),
    "model-type-multimodal": (lambda tmp, src: _config_only(tmp, "llava"), ["unsupported", "llava", "multimodal"]),
    "bidirectional-attention": (lambda tmp, src: _config_only(tmp, "gemma3_text", use_bidirectional_attention=True,
                                                              **_TINY_TEXT), ["unsupported", "bidirectional"]),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source(case, src, tmp_path, capsys):
    build, keywords = BAD_SOURCES[case]
    bad = build(tmp_path, src)
    capsys.readouterr()
    out = tmp_path / "out"
    assert_error(*run(capsys, bad, out), out, *keywords)


# --- bad options ------------------------------------------------------------------------------------------------------

def _opt(case, flags, *keywords, **kw):
    return pytest.param(flags, keywords, id=case, **kw)


BAD_OPTIONS = [
    _opt("budget-zero", ["--kv-budget", "0"], "--kv-budget", "(0, 1]"),
    _opt("budget-negative", ["--kv-budget", "-0.5"], "--kv-budget", "(0, 1]"),
    _opt("budget-above-one", ["--kv-budget", "1.5"], "--kv-budget", "(0, 1]"),
    _opt("budget-too-small", ["--kv-budget", "0.001"], "--kv-budget", "no room for a latent"),
    _opt("rank-too-large", ["--kv-lora-rank", "10000", "--rope-dim", "8"], "--kv-lora-rank 10000", "at most 56"),
    _opt("rank-zero", ["--kv-lora-rank", "0", "--rope-dim", "8"], "--kv-lora-rank", ">= 1"),
    _opt("rope-dim-odd", ["--kv-lora-rank", "8", "--rope-dim", "7"], "--rope-dim", "multiple of 2"),
    _opt("rope-dim-too-large", ["--kv-lora-rank", "8", "--rope-dim", "34"], "--rope-dim 34", "at most", "= 32"),
    _opt("rank-without-rope-dim", ["--kv-lora-rank", "8"], "both"),
    _opt("rope-dim-without-rank", ["--rope-dim", "8"], "both"),
    _opt("budget-and-rank", ["--kv-budget", "0.5", "--kv-lora-rank", "8", "--rope-dim", "8"], "not both"),
    _opt("calib-missing-file", ["--calib", "/nonexistent.txt"], "text source", "/nonexistent.txt"),
    _opt("calib-empty-file", ["--calib", "{tmp}/empty.txt"], "no non-empty documents"),
    _opt("calib-nonsense", ["--calib", "nonsense-spec"], "unknown text source", "nonsense-spec"),
    _opt("calib-hf-without-datasets", ["--calib", "hf:some/dataset:train"], "datasets",
         marks=pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")),
    _opt("calib-seqs-zero", ["--calib-seqs", "0"], "--calib-seqs"),
    _opt("dtype", ["--dtype", "float8"], "--dtype", "float8"),
    _opt("rope-method", ["--rope-method", "spin"], "--rope-method", "spin", "rotate"),
    _opt("factor-method", ["--factor-method", "qr"], "--factor-method", "qr", "fisher"),
    _opt("rank-alloc", ["--rank-alloc", "greedy"], "--rank-alloc", "greedy", "uniform"),
    _opt("rope-share", ["--rope-share", "1.5"], "--rope-share", "[0, 1)"),
    _opt("rope-span-zero", ["--rope-span", "0"], "--rope-span", ">= 1"),
    _opt("out-parent-missing", [], "parent folder"),
    _opt("format", ["--format", "gguf"], "--format", "gguf", "deepseek_v3"),
    _opt("format-deepseek-rope-method", ["--format", "deepseek_v3", "--rope-method", "high"], "deepseek_v3",
         "--rope-method"),
    _opt("format-deepseek-rope-too-wide", ["--format", "deepseek_v3", "--kv-lora-rank", "8", "--rope-dim", "20"],
         "--rope-dim", "head_dim 16"),
]


@pytest.mark.parametrize("flags, keywords", BAD_OPTIONS)
def test_bad_option(flags, keywords, src, tmp_path, capsys, request):
    (tmp_path / "empty.txt").write_text("\n  \n")
    parent = tmp_path / "missing-parent" if "out-parent-missing" in request.node.name else tmp_path
    out = parent / "out"
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert_error(*run(capsys, src, out, *flags), out, *keywords)


# --- recipes ----------------------------------------------------------------------------------------------------------

BAD_RECIPES = {
    "unknown-convert-key": ("convert:\n  kv_budgett: 0.5\n", ["unknown key", "kv_budgett"]),
    "unknown-top-level-key": ("convert:\n  kv_budget: 0.5\nbogus: 1\n", ["unknown key", "bogus"]),
    "invalid-yaml": ("convert: [unclosed\n", ["could not read recipe"]),
    "not-a-mapping": ("- convert\n", ["must be a mapping"]),
    "wrong-value-type": ("convert:\n  kv_budget: half\n", ["kv_budget", "half"]),
    "bool-as-string": ('convert:\n  overwrite: "no"\n', ["overwrite", "bool"]),
    "bad-value": ("convert:\n  kv_budget: 2\n", ["--kv-budget"]),
}


@pytest.mark.parametrize("case", ["missing-file", *BAD_RECIPES])
def test_bad_recipe(case, src, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    keywords = ["recipe not found"]
    if case != "missing-file":
        text, keywords = BAD_RECIPES[case]
        recipe.write_text(text)
    out = tmp_path / "out"
    assert_error(*run(capsys, src, out, "--recipe", recipe), out, *keywords)


# --- OUT handling -----------------------------------------------------------------------------------------------------


def test_existing_out_needs_overwrite(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_error(*run(capsys, src, out), out, "not empty", "--overwrite", out_exists=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"

    code, err = run(capsys, src, out, "--overwrite")
    assert code == 0, err
    assert {"config.json", "mla_conversion.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not (out / "keep.txt").exists()
    assert leftovers(out) == []


def test_out_is_a_file(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("precious")
    assert_error(*run(capsys, src, out, "--overwrite"), out, "not a folder", out_exists=True)
    assert out.read_text() == "precious"


@pytest.mark.parametrize("existing", [False, True], ids=["fresh-out", "overwrite-out"])
@pytest.mark.parametrize("late_step", ["write_json", "copy_remote_code"])
def test_interrupt_leaves_nothing(late_step, existing, src, tmp_path, capsys, monkeypatch):
    """Ctrl-C late in the pipeline: exit 130, one line, no new OUT, no temp sibling, an old OUT intact."""
    import convert.export

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert.export, late_step, interrupt)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    flags = ["--overwrite"] if existing else []
    assert_error(*run(capsys, src, out, *flags), out, "interrupted", exit_code=130, out_exists=existing)
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


# --- end to end -------------------------------------------------------------------------------------------------------


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    """The real entry point: exit status 2, one stderr line, no traceback (a GGUF whose header is cut short)."""
    bad = _file(tmp_path / "bad.gguf", b"GGUF\x03\x00\x00\x00garbage")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "convert.cli", "convert", str(bad), str(out), *FAST],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not read the config of"), proc.stderr
    assert not out.exists() and leftovers(out) == []
