"""Evaluation: BIG-bench task data, the local lm-eval tasks through stock lm-eval (CLI and HFLM), and ``mla eval``.

Parity: a lossless (budget 1.0) export must give lm-eval the same per-document log-likelihoods as its original,
within fp32 noise (TOL).
"""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import convert_tiny, fake_bigbench_sdist, lm_eval_tasks, multiple_choice_accuracy

TOL = 1e-3  # summed log-likelihood of a continuation, fp32
REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "eval" / "tasks"


# --------------------------------------------------------------------------------------------------- BIG-bench data
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_RETROFIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_bigbench_docs_from_a_local_sdist(cache, tmp_path, monkeypatch):
    from eval import bigbench

    sdist = fake_bigbench_sdist(tmp_path / bigbench.SDIST)
    monkeypatch.setenv("MLA_BIGBENCH_SDIST", str(sdist))
    social = bigbench.load_docs("social_iqa")
    assert len(social) == 10  # the tie has no single right answer
    assert all(d["choices"] == ["yes", "no", "maybe"] for d in social)
    assert sorted((d["question"], d["label"]) for d in social) == sorted(
        (f"Q: Question {i}?\nA:", i % 2) for i in range(10))
    assert [d["id"] for d in social] == list(range(10))
    assert social == bigbench.load_docs("social_iqa")  # fixed shuffle
    assert bigbench.load_docs("timedial")[0]["question"].startswith("Question: Question ")
    wino = bigbench.load_docs("winogrande")
    assert len(wino) == 10 and [d["label"] for d in wino] == [0, 1] * 5  # twins stay together
    first, second = wino[:2]
    assert first["contexts"][0].endswith("fit in the box because the cup")
    assert first["contexts"][1] == first["contexts"][0][:-3] + "box"
    assert (first["continuation"], second["continuation"]) == ("was small.", "was big.")
    assert sdist.exists()  # a local sdist is the user's: kept
    assert (cache / "data" / "bigbench" / "social_iqa" / "task.json").is_file()


def test_bigbench_download_through_a_package_index(cache, tmp_path, monkeypatch):
    from convert.errors import MLAError
    from eval import bigbench

    index = tmp_path / "index"
    (index / "bigbench").mkdir(parents=True)
    sdist = fake_bigbench_sdist(index / "bigbench" / bigbench.SDIST)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    (index / "bigbench" / "index.html").write_text(
        f'<html><body><a href="bigbench-0.0.1.tar.gz">old</a><a href="{bigbench.SDIST}#sha256={digest}">new</a>')
    monkeypatch.setenv("PIP_INDEX_URL", index.as_uri())
    monkeypatch.delenv("MLA_BIGBENCH_SDIST", raising=False)
    with pytest.raises(MLAError, match="has sha256 .*, expected"):  # the real sdist's hash is pinned
        bigbench.data_root()
    assert not (cache / "data" / "bigbench" / ".complete").exists()
    monkeypatch.setattr(bigbench, "SDIST_SHA256", digest)
    root = bigbench.data_root()
    assert (root / "goal_step_wikihow" / "goal_inference" / "task.json").is_file()
    assert not list((cache / "downloads" / "bigbench").iterdir())  # only the extracted files are kept
    assert len(bigbench.load_docs("goal_step")) == 10


def test_bigbench_errors(cache, tmp_path, monkeypatch):
    from convert.errors import MLAError
    from eval import bigbench

    monkeypatch.setenv("MLA_BIGBENCH_SDIST", str(tmp_path / "missing.tar.gz"))
    with pytest.raises(MLAError, match="is not a file"):
        bigbench.data_root()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tarball")
    monkeypatch.setenv("MLA_BIGBENCH_SDIST", str(bad))
    with pytest.raises(MLAError, match="cannot read"):
        bigbench.data_root()
    monkeypatch.setenv("MLA_BIGBENCH_SDIST", str(fake_bigbench_sdist(tmp_path / "broken.tar.gz", broken_json=True)))
    with pytest.raises(MLAError, match="cannot read .*task.json"):
        bigbench.load_docs("social_iqa")
    with pytest.raises(MLAError, match="unknown BIG-bench task 'hellaswag'"):
        bigbench.load_docs("hellaswag")


@pytest.mark.network
def test_real_bigbench_tasks():
    """The real sdist from PyPI (downloaded once into the user cache): sizes and a golden first document. Skipped
    only where the package index no longer offers the pinned sdist (PyPI listed just bigbench 0.0.1 on 2026-12-05)
    and no local copy is given (``$MLA_BIGBENCH_SDIST``); any other failure fails."""
    from convert.errors import MLAError
    from eval import bigbench

    try:
        bigbench.data_root()
    except MLAError as err:
        if f"lists no {bigbench.SDIST}" not in str(err):
            raise
        pytest.skip(f"the real BIG-bench data cannot be had here: {err}")

    sizes = {name: len(bigbench.load_docs(name)) for name in bigbench.TASKS}
    assert sizes == {"winogrande": 2000, "social_iqa": 1954, "goal_step": 1703, "timedial": 2000}
    first = bigbench.load_docs("social_iqa")[0]
    assert first["question"].startswith("Q: taylor just got hired but he was already best friends")
    assert first["choices"][first["label"]] == "Jealous"
    for name in ("social_iqa", "goal_step", "timedial"):
        assert all(0 <= d["label"] < len(d["choices"]) for d in bigbench.load_docs(name))


# ------------------------------------------------------------------------------------------------- stock lm-eval
@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    convert_tiny(tiny_models["llama-gqa"], root / "lossless", kv_budget=1.0)
    convert_tiny(tiny_models["llama-gqa"], root / "half", kv_budget=0.5)
    return {"original": tiny_models["llama-gqa"], "lossless": root / "lossless", "half": root / "half"}


def _lm_eval_cli() -> str:
    exe = Path(sys.executable).with_name("lm_eval")
    return str(exe) if exe.exists() else shutil.which("lm_eval")


def _ll(resp) -> float:
    """The log-likelihood in one logged response: ``[(ll, is_greedy)]`` (multiple choice) or ``[ll]`` (rolling)."""
    first = resp[0]
    return float(first[0] if isinstance(first, (list, tuple)) else first)


def _samples(folder: Path) -> dict:
    """{task: {doc_id: [loglikelihood per choice]}} from lm-eval's --log_samples output."""
    out = {}
    for f in folder.rglob("samples_*.jsonl"):
        task = f.name.removeprefix("samples_").rsplit("_", 1)[0]
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out[task] = {r["doc_id"]: [_ll(resp) for resp in r["resps"]] for r in rows}
    return out


LM_TASKS = ["mla_bb_social_iqa", "mla_bb_winogrande", "mla_bbc_tech"]


@pytest.mark.network
def test_stock_lm_eval_cli_and_hflm_on_an_export(exports, tmp_path, bigbench_standin):
    """lm_eval --include_path eval/tasks on a lossless export == lm-eval's Python API on its original, per document."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    run = subprocess.run(
        [_lm_eval_cli(), "--model", "hf", "--model_args", f"pretrained={exports['lossless']},trust_remote_code=True",
         "--include_path", str(TASKS_DIR), "--tasks", ",".join(LM_TASKS), "--limit", "6", "--batch_size", "4",
         "--log_samples", "--output_path", str(tmp_path / "cli")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert run.returncode == 0, run.stderr[-3000:]
    cli = _samples(tmp_path / "cli")  # (os.environ holds the stand-in's paths: bigbench_standin set them)
    results = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"]
    # the accuracy and each choice's log-likelihood, scored apart with plain forwards of the original
    acc, lls = multiple_choice_accuracy(exports["original"], "mla_bb_social_iqa", 6, TASKS_DIR)
    assert results["mla_bb_social_iqa"]["acc,none"] == pytest.approx(acc, abs=1e-9)
    assert cli["mla_bb_social_iqa"].keys() == lls.keys()
    for doc, want in lls.items():
        assert cli["mla_bb_social_iqa"][doc] == pytest.approx(want, abs=TOL), doc

    manager = lm_eval_tasks(str(TASKS_DIR))
    ref = {}
    for name in ("original", "lossless"):
        lm = HFLM(pretrained=str(exports[name]), trust_remote_code=True, batch_size=4, device="cpu")
        out = lm_eval.simple_evaluate(model=lm, tasks=LM_TASKS, limit=6, task_manager=manager, log_samples=True)
        ref[name] = ({t: {s["doc_id"]: [_ll(r) for r in s["resps"]] for s in out["samples"][t]}
                      for t in LM_TASKS}, out["results"])
    for got in (cli, ref["lossless"][0]):
        for task in LM_TASKS:
            assert got[task].keys() == ref["original"][0][task].keys()
            for doc, lls in got[task].items():
                assert lls == pytest.approx(ref["original"][0][task][doc], abs=TOL), (task, doc)
    assert ref["lossless"][1]["mla_bb_social_iqa"]["acc,none"] == ref["original"][1]["mla_bb_social_iqa"]["acc,none"]
    wp = [ref[n][1]["mla_bbc_tech"]["word_perplexity,none"] for n in ("original", "lossless")]
    assert math.isfinite(wp[0]) and abs(wp[1] / wp[0] - 1) < 1e-4


# ------------------------------------------------------------------------------------------------------ mla eval
@pytest.mark.network
def test_mla_eval_report(exports, tmp_path, capsys, bigbench_standin):
    from convert.cli import main
    from PIL import Image

    out = tmp_path / "report"
    argv = ["eval", str(exports["lossless"]), str(exports["half"]), "--baseline", str(exports["original"]),
            "--out", str(out), "--tasks", "mla_bb_social_iqa", "--limit", "4", "--ppl-text", "pydoc",
            "--ppl-tokens", "512", "--ppl-seq-len", "128", "--speed-prompt", "16", "--speed-new", "4",
            "--batch-size", "4"]
    assert main(argv) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("evaluated 3 model(s)") and "lossless ppl 1.000x KV 100.0%; half" in summary
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "report.png", "results.json"]
    res = json.loads((out / "results.json").read_text())
    original, lossless, half = res["models"]
    assert [r["name"] for r in res["models"]] == ["original", "lossless", "half"]
    assert lossless["kv_bytes_per_token"] == original["kv_bytes_per_token"]  # budget 1.0 keeps the size
    record = json.loads((exports["half"] / "mla_conversion.json").read_text())["kv_cache"]
    assert half["kv_bytes_per_token"] == record["mla_bytes_per_token"]  # measured == what convert recorded
    assert abs(lossless["ppl"] / original["ppl"] - 1) < 1e-4 and original["ppl_stderr"] > 0
    # each model's accuracy, scored apart with plain forwards of its folder
    acc = {name: multiple_choice_accuracy(exports[name], "mla_bb_social_iqa", 4, TASKS_DIR)[0]
           for name in ("original", "half")}
    for r in res["models"]:
        assert r["tasks"]["mla_bb_social_iqa"]["samples"] == 4 and r["speed"]["decode_tok_s"] > 0
        want = acc["original" if r["name"] == "lossless" else r["name"]]
        assert r["tasks"]["mla_bb_social_iqa"]["acc"] == pytest.approx(want, abs=1e-9), r["name"]
    md = (out / "report.md").read_text()
    assert "| KV cache, bytes/token |" in md and "mla_bb_social_iqa acc" in md and "(1.000x)" in md
    assert md.startswith("# mla eval report") and " ".join(argv[1:4]) in md
    with Image.open(out / "report.png") as img:
        assert img.format == "PNG" and img.size[0] > 1000  # three panels: tasks, perplexity, quality vs KV


def test_mla_eval_refuses_bad_input_before_loading(exports, tmp_path, capsys):
    from convert.cli import main

    out = tmp_path / "report"
    common = ["--out", str(out), "--tasks", "", "--ppl-text", "", "--speed-prompt", "0"]
    cases = [
        ([str(tmp_path / "nope"), *common], "nope"),
        ([str(exports["half"]), "--tasks", "no_such_task", "--out", str(out)], "unknown lm-eval task(s): no_such_task"),
        ([str(exports["half"]), *common, "--limit", "-1"], "--limit"),
        ([str(exports["half"]), *common, "--dtype", "int8"], "--dtype"),
    ]
    for args, message in cases:
        assert main(["eval", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
        assert not out.exists()
    out.mkdir()
    (out / "keep").write_text("x")
    assert main(["eval", str(exports["half"]), *common]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_mla_eval_kv_only(exports, tmp_path, capsys):
    """No tasks, no perplexity, no probe: still a report (the measured KV cache), and no baseline needed."""
    from convert.cli import main

    out = tmp_path / "r"
    assert main(["eval", str(exports["half"]), "--out", str(out), "--tasks", "", "--ppl-text", "",
                 "--speed-prompt", "0"]) == 0
    res = json.loads((out / "results.json").read_text())
    record = json.loads((exports["half"] / "mla_conversion.json").read_text())["kv_cache"]
    assert res["baseline"] is None and res["models"][0]["kv_bytes_per_token"] == record["mla_bytes_per_token"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
