"""``mla bench`` guards: settings refused before any run, a capacity search bounded by the memory there is, probes
that run out of memory counted as not fitting, and a ``--json`` file kept up to date after every probe. Out of memory
is simulated (a raising function, a fake MemAvailable), never reached: the one real process stopped at its bound is
a plain Python loop stopped near 120 MiB."""

import json
import sys

import pytest

import eval.bench as bench_mod
from conftest import make_tiny, one_error
from convert.cli import main
from convert.errors import MLAError
from eval.bench import BenchConfig

ALLOC_ERROR = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes. Error code 12"


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


def test_cpu_allocator_failure_does_not_fit(tiny, monkeypatch):
    """The one-process search (CUDA's): a probe whose cache cannot be allocated by the CPU allocator does not fit,
    and the search goes on."""
    real = bench_mod._filled_cache

    def filled(model, batch, context, gen):
        if batch > 2:
            raise RuntimeError(ALLOC_ERROR)
        return real(model, batch, context, gen)

    monkeypatch.setattr(bench_mod, "_filled_cache", filled)
    cfg = BenchConfig(context="8", new_tokens=1, runs=1, capacity=True, max_batch=8, device="cpu")
    row = bench_mod.capacity(str(tiny), cfg, 8)
    assert row["max_batch"] == 2 and row["batch"] == 2
    assert [(p["batch"], p["fits"]) for p in row["probes"]] == [(1, True), (2, True), (4, False), (3, False)]
    assert row["probes"][2]["why"] == "out of memory"


def _fake_probe(peak_of, seen, json_path=None):
    """A CPU probe process: peak ``peak_of(batch)`` MiB; records (batch, bound given, probes already in the JSON)."""

    def child(path, cfg, batch, context, mode="measure"):
        assert mode == "probe"
        saved = None
        if json_path is not None and json_path.exists():
            saved = [len(m.get("probes", [])) for b in json.loads(json_path.read_text())["capacity"]
                     for m in b["models"]]
        seen.append((batch, cfg.memory_limit_mib, saved))
        return {"path": path, "batch": batch, "context": context, "decode_tok_s": 1.0 * batch,
                "kv_cache_mib": 1.0 * batch, "prefill_peak_mib": None, "peak_memory_mib": peak_of(batch)}

    return child


@pytest.mark.parametrize("limit, expect", [(None, 8), (5000, 8), (500, 4)])
def test_capacity_on_cpu_is_bounded_by_available_memory(tiny, tmp_path, monkeypatch, capsys, limit, expect):
    """MemAvailable 1000 MiB: probes may peak at 90% of it (900 MiB) with no --memory-limit-mib, or with a larger
    one; a smaller limit still wins. Peak 100 + 100 * batch MiB: batch 8 fits 900, batch 4 fits 500."""
    seen = []
    monkeypatch.setattr(bench_mod, "_mem_available_mib", lambda: 1000.0, raising=False)
    monkeypatch.setattr(bench_mod, "_device", lambda cfg: "cpu")
    monkeypatch.setattr(bench_mod, "_child", _fake_probe(lambda b: 100.0 + 100 * b, seen))
    out = tmp_path / "cap.json"
    extra = [] if limit is None else ["--memory-limit-mib", str(limit)]
    assert main(["bench", str(tiny), "--context", "64", "--capacity", "--max-batch", "1024", *extra,
                 "--json", str(out)]) == 0
    row = json.loads(out.read_text())["capacity"][0]["models"][0]
    bound = 900.0 if limit in (None, 5000) else 500.0
    assert row["max_batch"] == expect
    assert all(b <= 2 * expect + 1 for b, _, _ in seen)
    assert {given for _, given, _ in seen} == {bound}  # each probe process is held to the bound
    for p in row["probes"]:
        assert p["fits"] == (100 + 100 * p["batch"] <= bound)
        if not p["fits"]:
            assert f"{bound:g} MiB" in p["why"]


def test_json_is_rewritten_after_every_probe(tiny, tmp_path, monkeypatch, capsys):
    seen = []
    child = _fake_probe(lambda b: 100.0 + b, seen, json_path=tmp_path / "cap.json")

    def failing(path, cfg, batch, context, mode="measure"):
        if len(seen) == 2:
            raise MLAError("the machine went away")
        return child(path, cfg, batch, context, mode)

    monkeypatch.setattr(bench_mod, "_mem_available_mib", lambda: 10**6, raising=False)
    monkeypatch.setattr(bench_mod, "_device", lambda cfg: "cpu")
    monkeypatch.setattr(bench_mod, "_child", failing)
    out = tmp_path / "cap.json"
    assert main(["bench", str(tiny), "--context", "64", "--capacity", "--json", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: the machine went away"
    assert [saved for _, _, saved in seen] == [[0], [1]]  # written as the model starts and after each probe
    row = json.loads(out.read_text())["capacity"][0]["models"][0]
    assert [(p["batch"], p["fits"]) for p in row["probes"]] == [(1, True), (2, True)]
    assert row["max_batch"] is None  # not found: the search was cut short


GROW = ("import sys, time\nchunks = []\nfor _ in range(50):\n    chunks.append(b'x' * (8 << 20))\n"
        "    time.sleep(0.02)\nprint('{\"done\": true}')\n")


def test_a_process_over_the_bound_is_killed(tmp_path):
    """A process that would grow to 400 MiB is stopped near a 120 MiB bound; one under it runs to the end."""
    killed = bench_mod._run([sys.executable, "-c", GROW], env=None, rss_limit_mib=120.0)
    assert killed.over is not None and 120 <= killed.over < 400 and killed.returncode != 0
    done = bench_mod._run([sys.executable, "-c", GROW], env=None, rss_limit_mib=2000.0)
    assert done.over is None and done.returncode == 0 and done.stdout.strip() == '{"done": true}'


def test_a_killed_probe_does_not_fit_and_a_killed_run_is_one_line(tiny, monkeypatch):
    bounds = []

    def run(cmd, env, rss_limit_mib, on_line=None):
        bounds.append(rss_limit_mib)
        return bench_mod.Finished(returncode=-9, stdout="", stderr="", over=rss_limit_mib + 3)

    monkeypatch.setattr(bench_mod, "_run", run)
    monkeypatch.setattr(bench_mod, "_mem_available_mib", lambda: 500.0)
    cfg = BenchConfig(context="8", capacity=True, memory_limit_mib=300.0, device="cpu")
    row = bench_mod._child(str(tiny), cfg, 4, 8, mode="probe")  # a CPU probe: held to the limit it is given
    assert row["oom"] and row["batch"] == 4 and "303 MiB" in row["why"] and "300 MiB" in row["why"]
    assert bench_mod._fits(row, None) == (False, row["why"])
    with pytest.raises(MLAError, match="batch 4 x context 8") as err:  # any other run: 90% of what is available
        bench_mod._child(str(tiny), BenchConfig(context="8", device="cpu"), 4, 8)
    assert "450 MiB" in str(err.value) and "\n" not in str(err.value)
    assert bounds == [300.0, 450.0]


def test_the_one_process_search_hands_each_probe_over_as_it_is_made(tiny, tmp_path, monkeypatch, capsys):
    """CUDA's search runs in one process: it prints each probe as a line before its result, and the parent saves
    the JSON at each of those lines."""
    from dataclasses import asdict

    cfg = BenchConfig(context="8", new_tokens=1, runs=1, capacity=True, max_batch=2, device="cpu")
    assert bench_mod._worker([str(tiny), json.dumps(asdict(cfg)), "0", "8", "capacity"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    final = json.loads(lines[-1])
    assert [json.loads(line) for line in lines[:-1]] == [{"probe": p} for p in final["probes"]]
    assert [p["batch"] for p in final["probes"]] == [1, 2] and final["max_batch"] == 2

    out, saved = tmp_path / "cap.json", []

    def child(path, cfg, batch, context, mode="measure", on_line=None):
        assert mode == "capacity"
        for line in ["a warning\n", *(line + "\n" for line in lines[:-1])]:
            on_line(line)
            saved.append(json.loads(out.read_text())["capacity"][0]["models"][0]["probes"])
        return final

    monkeypatch.setattr(bench_mod, "_device", lambda cfg: "cuda")
    monkeypatch.setattr(bench_mod, "_child", child)
    assert main(["bench", str(tiny), "--context", "8", "--capacity", "--json", str(out)]) == 0
    assert saved == [[], final["probes"][:1], final["probes"]]
    assert json.loads(out.read_text())["capacity"][0]["models"][0] == {"name": "tiny", **final}


@pytest.mark.parametrize("limit", [None, 500])
def test_a_probe_stopped_at_its_bound_does_not_fit_and_says_which_bound(tiny, tmp_path, monkeypatch, capsys, limit):
    """Probe processes that would peak at 100 + 100 * batch MiB, stopped at their bound: 90% of a MemAvailable of
    1000 MiB (900), or a --memory-limit-mib of 500."""
    def run(cmd, env, rss_limit_mib, on_line=None):
        batch, context = int(cmd[-3]), int(cmd[-2])
        if 100 + 100 * batch > rss_limit_mib:
            return bench_mod.Finished(returncode=-9, stdout="", stderr="", over=rss_limit_mib + 1)
        row = {"batch": batch, "context": context, "decode_tok_s": 1.0, "kv_cache_mib": 1.0,
               "prefill_peak_mib": None, "peak_memory_mib": 100.0 + 100 * batch}
        return bench_mod.Finished(returncode=0, stdout="a note\n" + json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(bench_mod, "_mem_available_mib", lambda: 1000.0)
    monkeypatch.setattr(bench_mod, "_device", lambda cfg: "cpu")
    monkeypatch.setattr(bench_mod, "_run", run)
    out = tmp_path / "cap.json"
    extra = [] if limit is None else ["--memory-limit-mib", str(limit)]
    assert main(["bench", str(tiny), "--context", "64", "--capacity", *extra, "--json", str(out)]) == 0
    row = json.loads(out.read_text())["capacity"][0]["models"][0]
    bound = limit or 900
    assert row["max_batch"] == (bound - 100) // 100
    stopped = [p for p in row["probes"] if not p["fits"]]
    assert stopped and all(p["why"] == f"stopped at {bound + 1} MiB, over its bound of {bound} MiB"
                           + ("" if limit else " (90% of the memory available)") for p in stopped)


def test_a_crashed_run_is_named_by_its_exception_not_by_its_last_line(tiny, monkeypatch):
    """A child's traceback whose message runs over several lines: the error names the exception's first line."""
    stderr = ('Traceback (most recent call last):\n  File "bench.py", line 1, in <module>\n    main()\n'
              'RuntimeError: a message that\nruns over lines with a quote\n"\n')
    monkeypatch.setattr(bench_mod, "_run", lambda *a, **k: bench_mod.Finished(1, "", stderr))
    with pytest.raises(MLAError) as err:
        bench_mod._child(str(tiny), BenchConfig(context="8", device="cpu"), 1, 8)
    assert str(err.value) == f"benchmark of {tiny} failed: RuntimeError: a message that"


def test_a_run_out_of_cpu_memory_is_one_line(tiny, monkeypatch, capsys):
    def measure(path, cfg, batch, context, kernels=True):
        raise RuntimeError(ALLOC_ERROR + "\nmore detail")

    monkeypatch.setattr(bench_mod, "measure", measure)
    settings = json.dumps({"context": "8", "device": "cpu"})
    assert bench_mod.run_command(bench_mod._worker, [str(tiny), settings, "3", "8", "measure"]) == 2
    assert capsys.readouterr().err.strip() == f"error: out of memory at batch 3 x context 8: {ALLOC_ERROR}"
