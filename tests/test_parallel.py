"""Recovery over several processes on the CPU (gloo, 2 processes), issue 26: data parallel (the default, under
torchrun) and sharded (``shard=true``, torch FSDP2, under accelerate launch with recipes/accelerate/multi-gpu.yaml)
give the losses of one process; a sharded run killed with
``kill -9`` resumes and ends with the weights of an uninterrupted one."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, convert_tiny, main_on_one_thread, make_tiny, one_error
from convert.recover import work_dir
from convert.recover.checkpoint import CKPT_NAME
from convert.recover.local import LOCAL_CKPT

STEPS = 12
ACCELERATE_CONFIG = ROOT / "recipes" / "accelerate" / "multi-gpu.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import pydoc_data.topics

    root = tmp_path_factory.mktemp("parallel")
    topics = list(pydoc_data.topics.topics.values())
    (root / "train.txt").write_text("\n\n".join(topics[: len(topics) // 2]))
    (root / "val.txt").write_text("\n\n".join(topics[len(topics) // 2:]))
    make_tiny(root / "src", "llama-gqa")
    convert_tiny(root / "src", root / "conv", kv_budget=0.25)
    return root


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
            "TRANSFORMERS_VERBOSITY": "error"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(setup, out: Path, processes: int, *extra, converted: Path | None = None) -> list[str]:
    """``mla finetune`` on the tiny export: one process, or ``processes`` through ``accelerate launch`` with the
    shipped config when sharded (``shard=true``), else through ``torchrun``."""
    if processes == 1:
        launch = [sys.executable]
    elif "shard=true" in extra:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
                  "--num_processes", str(processes), "--main_process_port", str(_free_port())]
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return [*launch, "-m", "convert.cli", *_finetune_argv(setup, out, *extra, converted=converted)]


def _finetune_argv(setup, out: Path, *extra, converted: Path | None = None) -> list[str]:
    return ["finetune", str(converted or setup / "conv"), str(out), f"data={setup / 'train.txt'}",
            f"val_data={setup / 'val.txt'}", "seq_len=64", "batch_size=4", f"tokens={64 * 4 * STEPS}",
            "val_tokens=256", "eval_every=4", "checkpoint_every=2", "lr=3e-3", "warmup_steps=1", "device=cpu", *extra]


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (torchrun's workers live in sessions of their own)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += [c for c, parent in parents.items() if parent == p]
    return found


def _run(setup, out: Path, processes: int, *extra, converted: Path | None = None) -> dict:
    """The recovery record of a run on ``processes`` processes; one process: in this process (the reference)."""
    if processes == 1:
        assert main_on_one_thread(*_finetune_argv(setup, out, *extra, converted=converted)) == 0
    else:
        proc = subprocess.run(_command(setup, out, processes, *extra, converted=converted), env=_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "mla_conversion.json").read_text())["recovery"]


@pytest.fixture(scope="module")
def one(setup):
    return _run(setup, setup / "one", 1)


def _same_run(a: dict, b: dict) -> None:
    """The losses, gradient norms and validation ratios of two runs agree to float32 noise."""
    for key in ("loss", "kl", "grad_norm"):
        assert [h[key] for h in a["history"]] == pytest.approx([h[key] for h in b["history"]], rel=1e-4, abs=1e-7)
    assert [e["ratio"] for e in a["val"]] == pytest.approx([e["ratio"] for e in b["val"]], rel=1e-5)


@pytest.mark.parametrize("extra", [(), ("shard=true",)], ids=["data-parallel", "sharded"])
def test_two_processes_give_the_losses_of_one(setup, one, extra):
    two = _run(setup, setup / f"two-{len(extra)}", 2, *extra)
    assert two["processes"] == 2 and len(two["history"]) == STEPS
    _same_run(two, one)
    a, b = load_file(setup / "one" / "model.safetensors"), load_file(setup / f"two-{len(extra)}" / "model.safetensors")
    assert set(a) == set(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


@pytest.fixture(scope="module")
def conv4(setup):
    """A 4-layer tiny conversion: two rounds of layers on 2 processes."""
    make_tiny(setup / "src4", "llama-gqa", num_hidden_layers=4)
    convert_tiny(setup / "src4", setup / "conv4", kv_budget=0.25)
    return setup / "conv4"


LOCAL = ("local_tokens=512", "local_epochs=16", "local_batch=2", "tokens=512")  # 8 windows, 64 steps a layer; 2 steps


@pytest.mark.parametrize("inputs, extra, trainers", [
    ("teacher", (), [0, 1, 0, 1]),  # independent layers: every second one each, two rounds of two
    ("teacher", ("shard=true",), [0, 1, 0, 1]),
    ("student", ("shard=true",), [0, 0, 0, 0]),  # layer i needs layer i - 1: the main process trains, sends
], ids=["teacher-inputs", "teacher-inputs-sharded", "student-inputs-sharded"])
def test_two_processes_share_the_layer_local_stage(setup, conv4, inputs, extra, trainers):
    """The layer-local stage on 2 processes: the layers are split between them as stated (each layer's record names
    the process that trained it) and the export equals one process's (same per-layer errors, same weights)."""
    args, out1 = (f"local_inputs={inputs}", *LOCAL), setup / f"local-{inputs}"
    out2 = setup / f"local-{inputs}-{'sharded' if extra else 'ddp'}"
    if not out1.exists():  # one process (shard=true needs several)
        _run(setup, out1, 1, *args, converted=conv4)
    one = json.loads((out1 / "mla_conversion.json").read_text())["recovery"]["local"]
    two = _run(setup, out2, 2, *args, *extra, converted=conv4)["local"]
    assert [e["process"] for e in one["layers"]] == [0, 0, 0, 0] and one["processes"] == 1
    assert [e["process"] for e in two["layers"]] == trainers and two["processes"] == 2
    assert [e["layer"] for e in two["layers"]] == [0, 1, 2, 3]
    for key in ("error_before", "error_after"):
        assert [e[key] for e in two["layers"]] == pytest.approx([e[key] for e in one["layers"]], rel=1e-5)
    a, b = load_file(out1 / "model.safetensors"), load_file(out2 / "model.safetensors")
    assert set(a) == set(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_shared_layer_local_stage_resumes_after_kill_9(setup, conv4):
    """A 2-process sharded run killed with ``kill -9`` once the first round of layers is checkpointed resumes after
    that round and ends with the weights of an uninterrupted 2-process run."""
    conv, args = conv4, ("local_inputs=teacher", *LOCAL, "shard=true")
    ref, out = setup / "local-teacher-sharded", setup / "local-killed"  # ref: the uninterrupted run of the test above
    if not ref.exists():
        _run(setup, ref, 2, *args, converted=conv)
    ckpt = work_dir(out) / LOCAL_CKPT
    proc = subprocess.Popen(_command(setup, out, 2, *args, converted=conv), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists():
        assert proc.poll() is None and time.time() < deadline, "no layer-local checkpoint appeared"
        time.sleep(0.01)
    for pid in _descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert torch.load(ckpt, weights_only=True)["done"] == 2  # the first round: layers 0 and 1
    again = subprocess.run(_command(setup, out, 2, *args, converted=conv), env=_env(), cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"layer-local stage: resuming from {ckpt} after layer 2" in again.stdout + again.stderr
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    local = json.loads((out / "mla_conversion.json").read_text())["recovery"]["local"]
    assert [e["process"] for e in local["layers"]] == [0, 1, 0, 1]


def test_sharded_teacher_cache_gives_the_losses_of_one(setup):
    """teacher_topk over a text that repeats: a process whose windows are all kept still joins the sharded teacher's
    forward when the other's are not (else the collective would hang); the losses are those of one process."""
    small = setup / "small.txt"
    small.write_text((setup / "train.txt").read_text()[:1200])  # ~12 windows of 64: 12 steps of 4 pass each ~4 times
    extra = (f"data={small}", "teacher_topk=8")
    one_run = _run(setup, setup / "cache-one", 1, *extra)
    _same_run(_run(setup, setup / "cache-two", 2, *extra, "shard=true"), one_run)


def test_sharded_run_resumes_after_kill_9(setup):
    ref = setup / "two-1"  # the uninterrupted sharded run of test_two_processes_give_the_losses_of_one
    if not ref.exists():
        _run(setup, ref, 2, "shard=true")
    out = setup / "sharded-killed"
    ckpt = work_dir(out) / CKPT_NAME
    proc = subprocess.Popen(_command(setup, out, 2, "shard=true"), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    for pid in _descendants(proc.pid):  # kill -9 of the whole job: the launcher and both workers
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    time.sleep(0.5)
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < STEPS and not out.exists()
    again = subprocess.run(_command(setup, out, 2, "shard=true"), env=_env(), cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {ckpt} at step" in again.stdout
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((ref / "mla_conversion.json").read_text())["recovery"]
    rb = json.loads((out / "mla_conversion.json").read_text())["recovery"]
    assert ra["history"] == rb["history"] and ra["val"] == rb["val"]
    assert not work_dir(out).exists()


def test_shard_on_one_process_is_one_line_error(setup, tmp_path):
    proc = subprocess.run(_command(setup, tmp_path / "out", 1, "shard=true"), env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    one_error(proc.returncode, proc.stderr, "shard=true on one process shards nothing")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists()
