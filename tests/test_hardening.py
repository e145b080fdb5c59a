"""Hardening, round 2 (issue 24): benchmarks never overwrite inputs, SIGTERM/SIGHUP and a full disk end like Ctrl-C
(one ``error:`` line, nothing left beside OUT), weight files follow the umask, malformed records and recipes are
one-line errors, a resumed recovery checks the content of what it reads, lengths are checked against the model.

Every case checks the exit status, the one ``error:`` line, inputs byte-identical and what is left beside OUT.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import convert_tiny
from convert.cli import main
from conftest import FAST, _env, _paused_convert, _wait_for_export_in_temp, cli, digest, leftovers, one_error

pytestmark = pytest.mark.usefixtures("_no_progress_output")  # conftest: no progress bars in stderr

ROOT = Path(__file__).resolve().parent.parent
EVAL_FAST = ["--tasks", "", "--ppl-text", "", "--speed-prompt", "0"]
BENCH_FAST = ["--context", "8", "--new-tokens", "2", "--runs", "1"]
TRAIN = ["data=pydoc", "val_data=", "tokens=512", "seq_len=32", "batch_size=2", "local_tokens=0"]


def last_error(code, err, *words, exit_code=2):
    """``one_error`` on the last line of stderr (a progress bar may precede it), and no traceback anywhere."""
    assert "Traceback" not in err, err
    return one_error(code, err.strip().splitlines()[-1], *words, exit_code=exit_code)


@pytest.fixture
def src(tiny_models):
    return tiny_models["llama-gqa"]


@pytest.fixture(scope="module")
def export(tiny_models, tmp_path_factory):
    """A converted tiny model (budget 0.5)."""
    out = tmp_path_factory.mktemp("export") / "mla"
    convert_tiny(tiny_models["llama-gqa"], out, kv_budget=0.5)
    return out


# --- 1, 2. mla bench-convert: --out follows the OUT rules, --json never replaces an input ----------------------------


def _bench_convert(tmp_path, *args):
    """``mla bench-convert tiny-llama`` in-process with the user cache in ``tmp_path``: (exit code, stderr)."""
    return main(["bench-convert", "tiny-llama", *map(str, args), "--", "--kv-budget", "0.25", *FAST])


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_RETROFIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_bench_convert_out_is_replaced_only_with_overwrite(src, tmp_path, user_cache, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    before = digest(out)
    code = _bench_convert(tmp_path, "--out", out, "--tokenizer", src)
    one_error(code, capsys.readouterr().err, "not empty", "--overwrite")
    assert digest(out) == before
    assert not (user_cache / "shapes" / "tiny-llama").exists()  # refused before the random checkpoint is written
    assert _bench_convert(tmp_path, "--out", out, "--tokenizer", src, "--overwrite") == 0
    assert (out / "mla_conversion.json").is_file() and not (out / "notes.txt").exists()
    assert leftovers(out) == [] and not (tmp_path / ".mine.lock").exists()


def test_bench_convert_json_is_never_an_input_or_inside_out(src, tmp_path, user_cache, capsys):
    tokenizer_model = tmp_path / "tok"
    shutil.copytree(src, tokenizer_model)
    before = digest(tokenizer_model)
    shape_dir = user_cache / "shapes" / "tiny-llama"
    out = tmp_path / "out"
    for target, words in ((tokenizer_model / "config.json", ["input", "tok"]),
                          (shape_dir / "config.json", ["input", "tiny-llama"]),
                          (out / "r.json", ["input", "out"])):
        code = _bench_convert(tmp_path, "--out", out, "--tokenizer", tokenizer_model, "--json", target)
        one_error(code, capsys.readouterr().err, "--json", *words)
    assert digest(tokenizer_model) == before and not out.exists() and not shape_dir.exists()


# --- 5. SIGTERM and SIGHUP clean up as Ctrl-C does --------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_convert_leaves_nothing(sig, src, tmp_path):
    out = tmp_path / "out"
    before = digest(src)
    proc = _paused_convert(src, out, 600)
    _wait_for_export_in_temp(out, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    one_error(proc.returncode, err, "terminated by", signal.Signals(sig).name, exit_code=128 + sig)
    assert list(tmp_path.iterdir()) == [] and digest(src) == before


def test_sigterm_during_finetune_keeps_the_checkpoint_and_nothing_else(export, tmp_path):
    """The last checkpoint stays for a resume (as after Ctrl-C); the lock, temporary folders and OUT do not."""
    from convert.recover import CKPT_NAME

    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "convert.cli", "finetune", str(export), str(out), "data=pydoc", "val_data=",
           "tokens=200000", "seq_len=32", "batch_size=2", "local_tokens=0", "checkpoint_every=1"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "ft.ckpt" / CKPT_NAME
    deadline = time.time() + 120
    while not ckpt.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: terminated by SIGTERM") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.ckpt"]
    assert [p.name for p in (tmp_path / "ft.ckpt").iterdir()] == [CKPT_NAME]


# --- 6. a full disk: one error line, nothing half-written -------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """``fill(free)``: a folder on a 4 MiB tmpfs filled up to ``free`` bytes (creating empty files still works)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")

    def fill(free: int) -> Path:
        with contextlib.suppress(OSError), open(disk / ".filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        os.truncate(disk / ".filler", max(0, (disk / ".filler").stat().st_size - free))
        return disk

    try:
        yield fill
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _left(disk: Path) -> list[str]:
    return sorted(p.name for p in disk.iterdir() if p.name != ".filler")


@pytest.mark.parametrize("free", [0, 8192, 100_000])
def test_full_disk_convert(free, src, small_disk, capsys):
    disk = small_disk(free)
    code = main(["convert", str(src), str(disk / "out"), *FAST])
    one_error(code, capsys.readouterr().err, "no space left")
    assert _left(disk) == []


def test_full_disk_finetune_at_the_first_checkpoint(export, small_disk, capsys):
    disk = small_disk(64 * 1024)  # less than a checkpoint
    code = main(["finetune", str(export), str(disk / "ft"), *TRAIN, "checkpoint_every=1"])
    last_error(code, capsys.readouterr().err, "no space left")
    assert _left(disk) == []


def test_full_disk_finetune_export_keeps_the_checkpoint(export, small_disk, capsys):
    """Room for the final checkpoint, not for the export: the checkpoint stays for a resume, nothing else does."""
    from convert.recover import CKPT_NAME

    disk = small_disk(1_000_000)
    code = main(["finetune", str(export), str(disk / "ft"), *TRAIN])
    last_error(code, capsys.readouterr().err, "no space left")
    assert _left(disk) == ["ft.ckpt"] and [p.name for p in (disk / "ft.ckpt").iterdir()] == [CKPT_NAME]


@pytest.mark.parametrize("free", [0, 8192, 16384])
def test_full_disk_eval_report(free, export, small_disk, capsys):
    disk = small_disk(free)
    code = main(["eval", str(export), "--out", str(disk / "report"), *EVAL_FAST])
    one_error(code, capsys.readouterr().err, "no space left")
    assert _left(disk) == []


def test_full_disk_json_of_bench_and_perplexity(export, small_disk, capsys):
    disk = small_disk(0)
    code = main(["bench", str(export), *BENCH_FAST, "--json", str(disk / "b.json")])
    one_error(code, capsys.readouterr().err, "no space left")
    proc = subprocess.run([sys.executable, "-m", "eval.perplexity", str(export), "--text", "pydoc", "--tokens", "64",
                           "--seq-len", "32", "--json", str(disk / "p.json")],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    one_error(proc.returncode, proc.stderr, "no space left")
    assert _left(disk) == []


def test_a_json_that_cannot_be_written_keeps_the_old_file(export, tmp_path, capsys, monkeypatch):
    """The JSON is written whole or not at all: a failure while writing leaves the previous file as it was."""
    import convert.files

    target = tmp_path / "b.json"
    target.write_text('{"old": true}\n')
    real = os.replace

    def fail(a, b):
        if Path(b) == target:
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(convert.files.os, "replace", fail)
    code = main(["bench", str(export), *BENCH_FAST, "--json", str(target)])
    one_error(code, capsys.readouterr().err, "no space left")
    assert target.read_text() == '{"old": true}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


# --- 7. every output file follows the umask ---------------------------------------------------------------------------


def test_weight_files_follow_the_umask(src, export, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        assert main(["convert", str(src), str(tmp_path / "out"), *FAST]) == 0
        assert main(["finetune", str(export), str(tmp_path / "ft"), *TRAIN]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes["out/model.safetensors"] == 0o640 and modes["ft/adapter/adapter_model.safetensors"] == 0o640
    assert {m for p, m in modes.items() if (tmp_path / p).is_file()} == {0o640}
    assert {m for p, m in modes.items() if (tmp_path / p).is_dir()} == {0o750}


# --- 8, 9. recovery: malformed records, the teacher's architecture, resume checks the content ----------------------


@pytest.mark.parametrize("record", [["a", "list"], {"source": "smollm2-135m"}, {"source": {"resolved": 7}}])
def test_malformed_conversion_record_is_one_line(record, export, tmp_path, capsys):
    conv = tmp_path / "conv"
    shutil.copytree(export, conv)
    (conv / "mla_conversion.json").write_text(json.dumps(record))
    before = digest(conv)
    code = main(["finetune", str(conv), str(tmp_path / "ft"), *TRAIN])
    one_error(code, capsys.readouterr().err, "mla_conversion.json")
    assert digest(conv) == before and sorted(p.name for p in tmp_path.iterdir()) == ["conv"]


def test_a_teacher_of_another_architecture_is_refused(export, tiny_models, tmp_path, capsys):
    """An edited ``source`` (or ``teacher=``) naming a model the export was not converted from: refused, naming the
    differing dimension, before any training."""
    conv = tmp_path / "conv"
    shutil.copytree(export, conv)
    record = json.loads((conv / "mla_conversion.json").read_text())
    record["source"]["resolved"] = str(tiny_models["llama-mha"])  # 4 KV heads, the export's source has 2
    (conv / "mla_conversion.json").write_text(json.dumps(record))
    code = main(["finetune", str(conv), str(tmp_path / "ft"), *TRAIN])
    one_error(code, capsys.readouterr().err, "not the model", "num_key_value_heads 4")
    code = main(["finetune", str(export), str(tmp_path / "ft"), *TRAIN, f"teacher={tiny_models['qwen2']}"])
    one_error(code, capsys.readouterr().err, "not the model", "model_type qwen2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]


def test_resume_checks_the_training_text_and_the_teacher(export, tmp_path, capsys):
    """A checkpoint resumes only with the same training text content and the same teacher weights; the error names
    what changed."""
    from safetensors.torch import load_file, save_file

    from convert.recover import CKPT_NAME

    train = tmp_path / "train.txt"
    train.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    teacher = tmp_path / "teacher"
    shutil.copytree(json.loads((export / "mla_conversion.json").read_text())["source"]["resolved"], teacher)
    args = [str(export), str(tmp_path / "ft"), f"data={train}", "val_data=", "tokens=4096", "seq_len=32",
            "batch_size=2", "local_tokens=0", "checkpoint_every=1", f"teacher={teacher}"]
    ckpt = tmp_path / "ft.ckpt" / CKPT_NAME
    import convert.recover.checkpoint

    real = convert.recover.checkpoint.save_checkpoint

    def stop_after_first(path, state):
        real(path, state)
        raise KeyboardInterrupt

    convert.recover.checkpoint.save_checkpoint = stop_after_first
    try:
        assert main(["finetune", *args]) == 130 and ckpt.exists()
    finally:
        convert.recover.checkpoint.save_checkpoint = real
    capsys.readouterr()
    train.write_text("Another text entirely, of the same length and more or less the same words. " * 120)
    one_error(main(["finetune", *args]), capsys.readouterr().err, "different run", "changed: the training text")
    train.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    weights = load_file(teacher / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = weights[name] * 1.5  # the same architecture, other weights
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    one_error(main(["finetune", *args]), capsys.readouterr().err, "different run", "changed: the teacher")
    assert ckpt.exists()


# --- 10. recipes, argparse, lengths ------------------------------------------------------------------------------


def _recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_yaml_alias_bomb_and_duplicate_keys_are_refused(src, tmp_path, capsys):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    bomb += "convert:\n  calib: *i\n"
    line = one_error(main(["convert", str(src), str(tmp_path / "o"), "--recipe", str(_recipe(tmp_path, bomb))]),
                     capsys.readouterr().err, "alias")
    assert len(line) < 300
    dup = "convert:\n  kv_budget: 0.5\n  kv_budget: 0.25\n"
    one_error(main(["convert", str(src), str(tmp_path / "o"), "--recipe", str(_recipe(tmp_path, dup))]),
              capsys.readouterr().err, "kv_budget", "twice", "line 3")
    long_value = "convert:\n  format: " + "x" * 50000 + "\n"
    line = one_error(main(["convert", str(src), str(tmp_path / "o"), "--recipe", str(_recipe(tmp_path, long_value))]),
                     capsys.readouterr().err, "format")
    assert len(line) < 300 and not (tmp_path / "o").exists()


def test_a_recipe_that_is_a_fifo_or_huge_is_refused(src, tmp_path, capsys):
    fifo = tmp_path / "r.fifo"
    os.mkfifo(fifo)
    one_error(main(["convert", str(src), str(tmp_path / "o"), "--recipe", str(fifo)]), capsys.readouterr().err,
              "not a regular file")
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(2**30)  # sparse: 1 GiB that costs no disk
    one_error(main(["convert", str(src), str(tmp_path / "o"), "--recipe", str(huge)]), capsys.readouterr().err,
              "bytes")


@pytest.mark.parametrize("argv, words", [
    (["convert"], ["the following arguments are required"]),
    (["convert", "a", "b", "--kv-budget", "half"], ["--kv-budget", "invalid float"]),
    (["nonsense"], ["invalid choice"]),
    (["bench-convert", "gpt-9"], ["invalid choice"]),
])
def test_usage_errors_are_one_line(argv, words):
    code, err = cli(*argv)
    one_error(code, err, *words)


def test_lengths_past_the_models_positions_are_refused_before_the_work(src, export, tmp_path, capsys):
    """The tiny models have 256 positions. (``mla bench`` measures speed only and may run past them: its memory
    tests use tiny models at long contexts.)"""
    cases = [
        (["eval", str(export), "--out", str(tmp_path / "r"), "--tasks", "", "--ppl-text", "", "--speed-prompt",
          "100000"], "--speed-prompt"),
        (["eval", str(export), "--out", str(tmp_path / "r"), "--tasks", "", "--ppl-text", "pydoc", "--ppl-seq-len",
          "512", "--ppl-tokens", "1024", "--speed-prompt", "0"], "--ppl-seq-len"),
        (["convert", str(src), str(tmp_path / "o"), "--calib", "pydoc", "--calib-len", "512"], "--calib-len"),
        (["finetune", str(export), str(tmp_path / "ft"), *TRAIN[:3], "seq_len=1024", *TRAIN[4:]], "seq_len"),
    ]
    for argv, word in cases:
        one_error(main(argv), capsys.readouterr().err, word, "max_position_embeddings 256")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    proc = subprocess.run([sys.executable, "-m", "eval.perplexity", str(export), "--seq-len", "1024", "--tokens",
                           "2048"], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    one_error(proc.returncode, proc.stderr, "--seq-len", "max_position_embeddings 256")
