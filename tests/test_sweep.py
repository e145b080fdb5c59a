"""``mla sweep`` on a tiny model: the original is measured in the same run, budget 1 reproduces it, files are written."""

import json

import pytest

from conftest import convert_tiny
from convert.cli import main

FAST = ["--calib", "pydoc", "--calib-seqs", "2", "--calib-len", "64", "--tokens", "256", "--seq-len", "64"]


@pytest.fixture
def eval_text(tmp_path):
    path = tmp_path / "held_out.txt"
    words = "the quick brown fox jumps over the lazy dog while a class statement defines a new object type".split()
    path.write_text("\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(300)) for i in range(8)))
    return path


def _stock_perplexity(model_dir, text_path, seq_len=64, tokens=256) -> float:
    """A model's perplexity on the sweep's windows (the source's, or an export's with its remote code), with stock
    transformers and a plain cross-entropy."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.data import load_texts
    from eval.perplexity import eval_windows

    windows = eval_windows(AutoTokenizer.from_pretrained(model_dir), load_texts(str(text_path)), seq_len, tokens)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]  # (n, T-1, V)
    return torch.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))).item()


def test_sweep_writes_table_and_plot(tiny_models, tmp_path, eval_text, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", str(tiny_models["llama-gqa"]), "--budgets", "1,0.5,0.25", "--methods", "default,norm-svd",
                 "--text", str(eval_text), "--out", str(out), *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| method | KV budget |" in printed and "swept 2 methods x 3 budgets" in printed
    result = json.loads((out / "sweep.json").read_text())
    rows = result["rows"]
    assert [(r["method"], r["budget"]) for r in rows] == [(m, b) for m in ("default", "norm-svd") for b in (1, 0.5, 0.25)]
    original = _stock_perplexity(tiny_models["llama-gqa"], eval_text)
    assert result["original_perplexity"] == pytest.approx(original, rel=1e-4)
    for r in rows:
        assert r["achieved_budget"] == pytest.approx(round(r["budget"] * 64) / 64)
        if r["budget"] == 1:
            assert r["ratio"] == pytest.approx(1.0, abs=1e-4)  # lossless, and the same windows as the original
    # a lossy point is what mla convert exports with the same method and budget, measured by stock transformers
    methods = {"default": {}, "norm-svd": dict(rope_method="norm", factor_method="svd", rank_alloc="uniform",
                                               rope_share=0.4)}
    for r in (rows[2], rows[5]):  # budget 0.25; the calibration text read is the sweep's (2 verification windows)
        export = tmp_path / f"{r['method']}-{r['budget']}"
        convert_tiny(tiny_models["llama-gqa"], export, kv_budget=r["budget"], calib_seqs=2, verify_seqs=2,
                     **methods[r["method"]])
        assert r["ratio"] == pytest.approx(_stock_perplexity(export, eval_text) / original, rel=1e-4), r
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sweep.csv").read_text().splitlines()[0].startswith("method,budget")
    assert "| default | 0.5 |" in (out / "sweep.md").read_text()


@pytest.mark.parametrize("flags, words", [
    (["--methods", "default,magic"], ["magic"]),
    (["--budgets", "0.5,2"], ["budget"]),
    (["--budgets", "half"], ["budgets"]),
    (["--calib", "{text}"], ["calibration text"]),
    (["--tokens", "10"], ["--tokens"]),
])
def test_sweep_bad_options(tiny_models, tmp_path, eval_text, capsys, flags, words):
    out = tmp_path / "sweep"
    flags = [f.replace("{text}", str(eval_text)) for f in flags]
    code = main(["sweep", str(tiny_models["llama-gqa"]), "--text", str(eval_text), "--out", str(out), *FAST, *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert all(w in err[0] for w in words)
    assert not out.exists()


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_sweep_on_qk_norm_families_skips_the_weight_only_svd(name, tiny_models, tmp_path, eval_text, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", str(tiny_models[name]), "--budgets", "1,0.5", "--methods", "default,norm-svd",
                 "--text", str(eval_text), "--out", str(out), "--no-plot", *FAST])
    assert code == 0
    assert "skipping norm-svd" in capsys.readouterr().out
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["method"], r["budget"]) for r in rows] == [("default", 1), ("default", 0.5)]
    assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-4)  # QK-norm: lossless at budget 1
