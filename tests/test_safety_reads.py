"""Safe text reads (issue 24, items 3 and 10): only regular files (and folders of them) are read as text, never more of
one than the read limit, and ``file:PATH`` names a path with commas in a mix.

A device (``/dev/zero``, ``/dev/urandom``) or a FIFO as ``--calib``, ``--ppl-text``, ``--text`` or ``data=`` is a
one-line error (exit 2) at once: no hang, no memory blow-up, nothing left beside OUT. The commands run in subprocesses
(the refused ones all in one, to import torch once) with a timeout (a FIFO that is opened blocks) and a heap limit (a
device read whole fills memory), so a regression fails the tests instead of hanging them or exhausting the machine.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from convert.data import MIN_READ_BYTES, load_sources, load_texts, read_budget, source_paths, split_sources
from convert.errors import MLAError
from conftest import FAST, ROOT, _env, digest, one_error

DATA_LIMIT = 4 * 2**30  # a child's heap may not pass this: reading a device whole would
PEAK_RUNNER = """import resource, runpy, sys
peak_file, sys.argv = sys.argv[1], sys.argv[2:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    with open(peak_file, "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""
LINES = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(2000))


def _limit_data():
    resource.setrlimit(resource.RLIMIT_DATA, (DATA_LIMIT, DATA_LIMIT))


def mla(*args, timeout: float = 120) -> tuple[int, str, int]:
    """``python -m convert.cli ARGS`` in a subprocess with the heap limit: (exit code, stderr, peak RSS in KiB)."""
    fd, name = tempfile.mkstemp(prefix="mla-peak-")
    os.close(fd)
    peak = Path(name)
    proc = subprocess.run([sys.executable, "-c", PEAK_RUNNER, str(peak), "convert.cli", *map(str, args)],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout,
                          preexec_fn=_limit_data)
    kib = int(peak.read_text() or 0)
    peak.unlink()
    return proc.returncode, proc.stderr, kib


@contextmanager
def deadline(seconds: int):
    """Fail (TimeoutError) instead of hanging when the body blocks, e.g. opening a FIFO."""
    def expire(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def workdir(tmp_path: Path) -> Path:
    """An empty folder for OUT, so that anything left beside OUT shows."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.fixture
def src(tiny_models):
    return tiny_models["llama-gqa"]


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.txt"
    os.mkfifo(path)
    return path


# --- the read limit and what is read, in-process -----------------------------------------------------------------------


def test_read_budget():
    assert read_budget() == MIN_READ_BYTES == 4 * 2**20
    assert read_budget(1000) == MIN_READ_BYTES
    assert read_budget(10**6) == 16 * 10**6


def test_long_file_is_read_up_to_the_limit_in_whole_lines(tmp_path, capsys):
    path = tmp_path / "long.txt"
    path.write_text(LINES)
    (doc,) = load_texts(str(path), max_bytes=1000)
    assert LINES.startswith(doc) and doc.endswith("\n") and 1000 - 60 < len(doc) <= 1000
    assert "longer than the read limit" in capsys.readouterr().err
    assert load_texts(str(path), max_bytes=len(LINES)) == [LINES]  # exactly at the limit: whole, no note
    assert capsys.readouterr().err == ""


def test_cut_without_line_breaks_keeps_whole_characters(tmp_path):
    path = tmp_path / "one-line.txt"
    path.write_text("é" * 1000)
    (doc,) = load_texts(str(path), max_bytes=101)  # 'é' is 2 bytes: the 101st byte starts a character
    assert doc == "é" * 50


def test_jsonl_is_cut_after_its_last_whole_record(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(100)))
    docs = load_texts(str(path), max_bytes=100)
    assert docs == [f"document {i}" for i in range(len(docs))] and 1 <= len(docs) <= 4
    with pytest.raises(MLAError, match="first line .* longer than"):
        load_texts(str(path), max_bytes=10)


def test_folder_shares_one_limit_over_its_files_in_order(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for name in "abc":
        (folder / f"{name}.txt").write_text(name * 59 + "\n" + name * 59 + "\n")  # 120 bytes each
    assert load_texts(str(folder), max_bytes=1000) == [n * 59 + "\n" + n * 59 + "\n" for n in "abc"]
    assert load_texts(str(folder), max_bytes=200) == ["a" * 59 + "\n" + "a" * 59 + "\n", "b" * 59 + "\n"]
    assert load_texts(str(folder), max_bytes=120) == ["a" * 59 + "\n" + "a" * 59 + "\n"]


def test_hf_dataset_is_read_up_to_the_limit(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "train.jsonl").write_text('{"text": "alpha"}\n{"text": "beta"}\n{"text": "gamma"}\n')
    assert load_texts(f"hf:{tmp_path}:train:text", max_bytes=7) == ["alpha", "be"]
    assert load_texts(f"hf:{tmp_path}:train:text") == ["alpha", "beta", "gamma"]


def test_fifos_and_devices_are_refused_without_opening(fifo):
    with deadline(20):
        with pytest.raises(MLAError, match="FIFO, not a regular file"):
            load_texts(str(fifo))
        with pytest.raises(MLAError, match="character device, not a regular file"):
            load_texts("/dev/zero")


def test_folder_reads_only_its_regular_files(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("real text")
    os.mkfifo(folder / "b.txt")
    (folder / "c.txt").symlink_to("/dev/zero")
    (folder / "d.txt").symlink_to(folder / "a.txt")  # a link to a regular file is one
    with deadline(20):
        assert load_texts(str(folder)) == ["real text", "real text"]
        (folder / "a.txt").unlink()
        (folder / "d.txt").unlink()
        with pytest.raises(MLAError, match=r"no \*\.txt files"):
            load_texts(str(folder))


# --- file:PATH names a path verbatim, commas included ------------------------------------------------------------------


def test_split_sources():
    assert split_sources(" pydoc, bbc:tech ,,brown ") == ["pydoc", "bbc:tech", "brown"]
    assert split_sources("pydoc,file:/x/a,b.txt") == ["pydoc", "file:/x/a,b.txt"]
    assert split_sources("file:a,b,c") == ["file:a,b,c"]
    assert split_sources(" ") == []


def test_comma_path_is_named_with_file_prefix(tmp_path, monkeypatch):
    path = tmp_path / "runs,2024" / "a,b.txt"
    path.parent.mkdir()
    path.write_text("comma text")
    pydoc, mine = load_sources(f"pydoc,file:{path}")
    assert mine == ["comma text"] and pydoc == load_texts("pydoc")
    assert source_paths(f"pydoc,file:{path}") == [path.resolve()]
    with pytest.raises(MLAError, match="unknown text source"):
        load_sources(str(path))  # a bare path is split on its commas
    with pytest.raises(MLAError, match="commas included"):
        load_sources(f"file:{path},pydoc")  # file: takes the rest: it comes last
    monkeypatch.chdir(tmp_path)
    Path("pydoc").write_text("a file called pydoc")
    assert load_texts("file:pydoc") == ["a file called pydoc"] and load_texts("pydoc") != ["a file called pydoc"]


# --- the commands: one error line, at once, nothing left beside OUT ----------------------------------------------------

CASE_SECONDS = 60
BATCH_RUNNER = f"""import contextlib, importlib, io, json, signal, sys, traceback
def expire(*_):
    raise TimeoutError("still running after {CASE_SECONDS} s")
signal.signal(signal.SIGALRM, expire)
results = []
for module, args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        signal.alarm({CASE_SECONDS})
        try:
            code = importlib.import_module(module).main(args)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
        signal.alarm(0)
    results.append([code, err.getvalue()])
with open(sys.argv[2], "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def commands(tiny_models, tmp_path_factory):
    """The commands of these tests, run in one subprocess (imports once) under the heap limit, each case stopped
    after CASE_SECONDS (a traceback then): {case: (exit code, stderr, the folder OUT was in)}."""
    from conftest import convert_tiny

    root = tmp_path_factory.mktemp("commands")
    src = tiny_models["llama-gqa"]
    fifo = root / "pipe.txt"
    os.mkfifo(fifo)
    export = root / "export"
    convert_tiny(src, export, kv_budget=0.5)
    commas = root / "calib,v2.txt"
    commas.write_text(LINES)
    cases = {
        "/dev/zero": ("convert.cli", ["convert", src, "OUT", *FAST, "--calib", "/dev/zero"]),
        "/dev/urandom": ("convert.cli", ["convert", src, "OUT", *FAST, "--calib", "/dev/urandom"]),
        "fifo calib": ("convert.cli", ["convert", src, "OUT", *FAST, "--calib", fifo]),
        "fifo ppl-text": ("convert.cli", ["eval", src, "--out", "OUT", "--tasks", "", "--speed-prompt", "0",
                                          "--ppl-text", fifo, "--ppl-seq-len", "32", "--ppl-tokens", "64"]),
        "perplexity": ("eval.perplexity", [src, "--text", "/dev/zero", "--seq-len", "32", "--tokens", "64"]),
        "finetune": ("convert.cli", ["finetune", export, "OUT", "data=/dev/zero", "seq_len=32", "val_data="]),
        "comma path": ("convert.cli", ["convert", src, "OUT", *FAST, "--calib", f"pydoc,file:{commas}"]),
    }
    before = digest(export), digest(commas)
    jobs, folders = [], {}
    for i, (case, (module, args)) in enumerate(cases.items()):
        folders[case] = root / f"work{i}"
        folders[case].mkdir()
        jobs.append([module, [str(folders[case] / "out") if a == "OUT" else str(a) for a in args]])
    results = root / "results.json"
    subprocess.run([sys.executable, "-c", BATCH_RUNNER, json.dumps(jobs), str(results)], env=_env(), cwd=ROOT,
                   timeout=len(jobs) * CASE_SECONDS + 120, preexec_fn=_limit_data, check=True)
    assert (digest(export), digest(commas)) == before
    return {case: (*result, folders[case]) for case, result in zip(cases, json.loads(results.read_text()))}


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_device_as_calibration_text(device, commands):
    code, err, work = commands[device]
    one_error(code, err, device, "character device", "only regular files")
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("case", ["fifo calib", "fifo ppl-text"])
def test_fifo_as_calibration_text_and_as_eval_ppl_text(case, commands):
    code, err, work = commands[case]
    one_error(code, err, "pipe.txt", "FIFO", "only regular files")
    assert list(work.iterdir()) == []  # no .out.lock


def test_perplexity_text_device(commands):
    code, err, _ = commands["perplexity"]
    one_error(code, err, "/dev/zero", "not a regular file")


def test_finetune_data_device(commands):
    code, err, work = commands["finetune"]
    one_error(code, err, "/dev/zero", "not a regular file")
    assert list(work.iterdir()) == []


def test_convert_with_a_comma_path_in_the_mix(commands):
    code, err, work = commands["comma path"]
    assert code == 0, err
    assert (work / "out" / "config.json").is_file() and sorted(p.name for p in work.iterdir()) == ["out"]
    record = json.loads((work / "out" / "mla_conversion.json").read_text())
    assert "calib,v2.txt" in json.dumps(record)


def test_large_file_converts_from_its_start_in_bounded_memory(src, tmp_path):
    """A 64 MiB calibration file: only its first 4 MiB are read (a note says so), and the run's peak memory stays
    within 1.5 GiB of a run on a small file (reading and tokenizing all of it would take over 10 GiB here)."""
    small = tmp_path / "small.txt"
    small.write_text(LINES)
    code, err, small_peak = mla("convert", src, tmp_path / "small-out", *FAST, "--calib", small)
    assert code == 0, err
    big = tmp_path / "big.txt"
    block = (LINES * (2**20 // len(LINES) + 1))[: 2**20].encode()
    with open(big, "wb") as f:
        for _ in range(64):
            f.write(block)
    before = digest(big)
    work = workdir(tmp_path)
    code, err, peak = mla("convert", src, work / "out", *FAST, "--calib", big)
    assert code == 0, err
    assert "Traceback" not in err and "using its first 4.0 MiB" in err
    assert peak - small_peak < 1.5 * 2**20, (peak, small_peak)  # KiB
    assert digest(big) == before and sorted(p.name for p in work.iterdir()) == ["out"]
