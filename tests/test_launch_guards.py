"""Launches and defaults that must not trap a user: a command that runs in one process refuses a multi-process launch
(torchrun, accelerate launch) with one line; a multi-process ``mla finetune`` whose OUT is locked by another run ends
at once, its other ranks too; ``mla convert``'s default calibration length fits a model with fewer positions; ``make
clean`` removes only folders of the repository, whatever the environment says."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, ROOT, _env, convert_tiny, leftovers, make_tiny, one_error
from convert.cli import main
from convert.files import out_lock

pytestmark = pytest.mark.usefixtures("_no_progress_output")  # conftest: no progress bars in stderr


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny llama (2 layers, hidden 64) with 256 positions."""
    folder = tmp_path_factory.mktemp("guards") / "src"
    make_tiny(folder, "llama-gqa")
    assert json.loads((folder / "config.json").read_text())["max_position_embeddings"] == 256
    return folder


@pytest.fixture(scope="module")
def converted(src):
    out = src.parent / "conv"
    convert_tiny(src, out, kv_budget=0.5)
    return out


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (torchrun's workers may live in sessions of their own)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += [c for c, parent in parents.items() if parent == p]
    return found


def _launch(args: list[str], timeout: float) -> tuple[int | None, str, float]:
    """``torchrun --nproc_per_node 2 -m convert.cli ARGS``: (exit status or None when it ran past ``timeout`` and
    was killed with every process under it, stderr, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "convert.cli", *map(str, args)]
    start = time.time()
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err, time.time() - start
    except subprocess.TimeoutExpired:
        for pid in reversed(_descendants(proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate()
        return None, err, time.time() - start


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


# --- a command that runs in one process refuses a launcher's several ---------------------------------------------

@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2", "RANK": "0"}, {"LOCAL_WORLD_SIZE": "2"}, {"RANK": "1"}],
                         ids=["world-size", "local-world-size", "rank"])
def test_convert_refuses_a_multi_process_launch(src, tmp_path, capsys, monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    code = main(["convert", str(src), str(out), *FAST])
    line = one_error(code, capsys.readouterr().err, "mla convert", "one process", "mla finetune")
    assert "torchrun" in line and "accelerate launch" in line
    assert not out.exists() and leftovers(out) == [] and not (tmp_path / ".out.lock").exists()


def test_other_commands_refuse_a_multi_process_launch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    for argv in (["perplexity", str(tmp_path / "missing")], ["sweep", str(tmp_path / "missing")],
                 ["bench", str(tmp_path / "missing")]):
        one_error(main(argv), capsys.readouterr().err, f"mla {argv[0]}", "one process")


def test_convert_under_torchrun_leaves_nothing(src, tmp_path):
    """Both ranks stop at once with the one line; no lock, no OUT, no checkpoint folder stays."""
    out = tmp_path / "out"
    code, err, _ = _launch(["convert", src, out, *FAST], timeout=60)
    assert code not in (0, None), err[-3000:]
    lines = _errors(err)
    assert len(lines) == 2 and all("one process" in line for line in lines), err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- a multi-process finetune into a locked OUT ends at once ----------------------------------------------------

def test_finetune_ranks_end_at_once_when_out_is_locked(converted, tmp_path):
    """Rank 0 refuses the held lock; rank 1, waiting to join the process group, must end on the launcher's SIGTERM
    instead of waiting for its SIGKILL (half a minute later)."""
    out = tmp_path / "out"
    args = ["finetune", converted, out, "data=pydoc", "val_data=", "seq_len=32", "batch_size=2", "tokens=128",
            "device=cpu"]
    with out_lock(out):
        code, err, seconds = _launch(args, timeout=90)
    assert code is not None, f"still running after {seconds:.0f}s:\n{err[-3000:]}"
    assert code != 0 and any("being written by another mla process" in line for line in _errors(err)), err[-3000:]
    # torchrun's report: rank 1 ended by the SIGTERM (exit code -15), not by the SIGKILL that follows it (-9)
    assert re.search(r"exitcode\s*:\s*-15\b", err) and not re.search(r"exitcode\s*:\s*-9\b", err), err[-3000:]
    assert not out.exists() and leftovers(out) == [] and not Path(f"{out}.ckpt").exists()


# --- make clean removes only what the repository holds -----------------------------------------------------------

def _fake_repo(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the Makefile in a folder with a ``.venv`` and an ``out`` (the repository), and a folder beside it
    that no target may touch (the victim)."""
    repo, victim = tmp_path / "repo", tmp_path / "victim"
    for folder in (repo / ".venv" / "bin", repo / "out", victim):
        folder.mkdir(parents=True)
        (folder / "keep.txt").write_text("x")
    shutil.copy(ROOT / "Makefile", repo / "Makefile")
    (repo / "pyproject.toml").write_text("")
    return repo, victim


def _make(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", str(repo), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=30)


def test_exported_paths_do_not_reach_make(tmp_path):
    """An exported VENV, PYTHON or DEMO_OUT is not what make clean removes, nor what make demo writes."""
    repo, victim = _fake_repo(tmp_path)
    env = {"VENV": str(victim), "PYTHON": str(victim / "python"), "DEMO_OUT": str(victim),
           "QUICK_OUT": str(victim), "DS_OUT": str(victim), "REPORT_OUT": str(victim), "LLAMA_OUT": str(victim)}
    for target in ("demo", "demo-quick", "demo-deepseek", "bench-llama-cpp"):
        planned = _make(repo, "-n", target, **env)
        assert planned.returncode == 0 and str(victim) not in planned.stdout, planned.stdout + planned.stderr
    done = _make(repo, "clean", **env)
    assert done.returncode == 0, done.stderr
    assert (victim / "keep.txt").exists()
    assert not (repo / ".venv").exists() and not (repo / "out").exists()


@pytest.mark.parametrize("venv", ["{victim}", "..", ".", "out/../..", ""], ids=["outside", "parent", "repo",
                                                                               "dotdot", "empty"])
def test_make_clean_refuses_a_venv_outside_the_repository(tmp_path, venv):
    repo, victim = _fake_repo(tmp_path)
    done = _make(repo, "clean", f"VENV={venv.format(victim=victim)}")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[:1] and "VENV" in lines[0], done.stderr
    assert (victim / "keep.txt").exists() and (repo / "Makefile").exists() and (repo / ".venv" / "bin" / "keep.txt").exists()


def test_make_clean_removes_a_venv_given_on_the_command_line_inside_the_repository(tmp_path):
    repo, victim = _fake_repo(tmp_path)
    (repo / "env2" / "bin").mkdir(parents=True)
    done = _make(repo, "clean", "VENV=env2")
    assert done.returncode == 0, done.stderr
    assert not (repo / "env2").exists() and not (repo / "out").exists() and (repo / ".venv").exists()
    assert (victim / "keep.txt").exists()


# --- a default fits the model; a value the user gave is checked -------------------------------------------------

SMALL = ["--calib", "pydoc", "--calib-seqs", "2", "--verify-seqs", "1", "--kv-budget", "0.5"]  # no --calib-len


def test_default_calibration_length_fits_a_model_with_fewer_positions(src, tmp_path, capsys):
    """The default --calib-len (512) is cut to the tiny model's 256 positions instead of refusing the model."""
    positions = json.loads((src / "config.json").read_text())["max_position_embeddings"]
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), *SMALL]) == 0, capsys.readouterr().err
    record = json.loads((out / "mla_conversion.json").read_text())
    assert record["calibration"]["seq_len"] == positions == 256


def test_a_calibration_length_the_user_gave_is_still_refused(src, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["convert", str(src), str(out), *SMALL, "--calib-len", "512"])
    one_error(code, capsys.readouterr().err, "--calib-len needs 512 positions", "max_position_embeddings 256")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("convert:\n  calib_len: 300\n")
    code = main(["convert", str(src), str(out), *SMALL, "--recipe", str(recipe)])
    one_error(code, capsys.readouterr().err, "--calib-len needs 300 positions")
    assert not out.exists() and leftovers(out) == []


def test_default_training_length_fits_a_model_with_fewer_positions(converted, tmp_path, capsys):
    """mla finetune's default seq_len (512) is cut to the teacher's 256 positions; seq_len=512 given is refused."""
    positions = json.loads((converted.parent / "src" / "config.json").read_text())["max_position_embeddings"]
    common = ["data=pydoc", "val_data=", "batch_size=1", "tokens=256", "device=cpu"]
    out = tmp_path / "out"
    assert main(["finetune", str(converted), str(out), *common]) == 0, capsys.readouterr().err
    recovery = json.loads((out / "mla_conversion.json").read_text())["recovery"]
    assert recovery["settings"]["seq_len"] == positions == 256 and recovery["tokens_seen"] == 256
    capsys.readouterr()  # the run's progress
    refused = tmp_path / "refused"
    code = main(["finetune", str(converted), str(refused), *common, "seq_len=512"])
    one_error(code, capsys.readouterr().err, "seq_len needs 512 positions", "max_position_embeddings 256")
    assert not refused.exists() and leftovers(refused) == []
