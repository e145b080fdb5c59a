"""Weight and config checks (issue 24): a safetensors header, a config dimension or a layer count that claims more than
the files hold, a malformed value (``head_dim: 0``, ``rope_theta: -1``) or an unreadable weights file ends in one
``error:`` line, exit status 2, before anything is allocated: no traceback, inputs byte-identical, nothing left
beside OUT, and (for the huge claims, run in a child process) little time and memory.
"""

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from convert.cli import main
from conftest import FAST, ROOT, _edit_config, _env, _permission_bits_apply, digest, one_error

pytestmark = pytest.mark.usefixtures("_no_progress_output")  # conftest: no progress bars in stderr

EMBED = "model.embed_tokens.weight"
ROW_BYTES = 64 * 4  # one float32 row of the tiny models' embedding (hidden 64)
VOCAB = 320
PEAK_RSS = 2**30  # a refused claim costs no more than importing the CLI (about 0.4 GB here)
MEMORY_CAP = 16 * 2**30  # address space of the child: a regression fails here instead of straining the machine
SECONDS = 60


@pytest.fixture
def src(tiny_models):
    return tiny_models["llama-gqa"]


# --- helpers ----------------------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict, bytes]:
    """(header JSON, data section) of a safetensors file, parsed by hand: 8-byte little-endian length, JSON, data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _with_header(src: Path, folder: Path, edit, **config) -> Path:
    """A copy of ``src`` (config ``config`` changed) whose safetensors header ``edit(header, data length)`` rewrote;
    the data bytes stay as they are."""
    _edit_config(src, folder, **config)
    header, data = _read_safetensors(folder / "model.safetensors")
    edit(header, len(data))
    _write_safetensors(folder / "model.safetensors", header, data)
    return folder


def _convert(folder: Path, tmp_path: Path, capsys) -> tuple[int, str, Path]:
    """``mla convert FOLDER OUT`` in-process, OUT alone in its own parent folder: (exit code, stderr, OUT)."""
    out = tmp_path / "outs" / "out"
    out.parent.mkdir()
    capsys.readouterr()
    code = main(["convert", str(folder), str(out), *FAST])
    return code, capsys.readouterr().err, out


def _cap_child() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    resource.setrlimit(resource.RLIMIT_CPU, (2 * SECONDS, 2 * SECONDS))


# The child's own peak (VmHWM of its address space since exec): a forked child's getrusage/wait4 peak starts from
# the parent's resident size, which is pytest's (over 1 GB late in the suite).
_RUNNER = """import sys
from convert.cli import main
try:
    code = main(sys.argv[2:])
finally:
    hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
    open(sys.argv[1], "w").write(hwm)
sys.exit(code)
"""


def _measured_convert(folder: Path, out: Path) -> tuple[int, str, float, int]:
    """``mla convert FOLDER OUT`` in a capped child process: (exit code, stderr, seconds, the child's peak RSS; a
    child killed before it could report counts as the memory cap)."""
    with tempfile.TemporaryFile("w+") as err, tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "peak"
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", _RUNNER, str(report), "convert", str(folder), str(out), *FAST],
                              stdout=subprocess.DEVNULL, stderr=err, env=_env(), cwd=ROOT, preexec_fn=_cap_child)
        seconds = time.monotonic() - t0
        err.seek(0)
        peak = int(report.read_text()) * 1024 if report.exists() else MEMORY_CAP
        return proc.returncode, err.read(), seconds, peak


def _refused_cheaply(folder: Path, tmp_path: Path, *words) -> str:
    """Convert ``folder`` in a child: one error line holding ``words``, fast, small, inputs and OUT's folder intact."""
    before = digest(folder)
    out = tmp_path / "outs" / "out"
    out.parent.mkdir()
    code, err, seconds, peak = _measured_convert(folder, out)
    line = one_error(code, err, *words)
    assert seconds < SECONDS, seconds
    assert peak < PEAK_RSS, f"peak RSS {peak / 2**30:.2f} GiB"
    assert digest(folder) == before and list(out.parent.iterdir()) == []
    return line


def _refused(folder: Path, tmp_path: Path, capsys, *words) -> str:
    """Convert ``folder`` in-process: one error line holding ``words``, inputs and OUT's folder intact."""
    before = digest(folder)
    code, err, out = _convert(folder, tmp_path, capsys)
    line = one_error(code, err, *words)
    assert "Traceback" not in err
    assert digest(folder) == before and list(out.parent.iterdir()) == []
    return line


# --- safetensors headers: every shape needs exactly the bytes its offsets hold, inside the file ----------------------


def test_a_huge_header_shape_is_refused_before_any_allocation(src, tmp_path):
    """Config vocab 1e9 and header shape [1e9, 64] over 320 rows of bytes used to try to allocate 256 GB."""
    def huge(header, size):
        header[EMBED]["shape"] = [10**9, 64]

    folder = _with_header(src, tmp_path / "huge", huge, vocab_size=10**9)
    _refused_cheaply(folder, tmp_path, "could not load the weights", "model.safetensors", "[1000000000, 64]",
                     f"needs {10**9 * ROW_BYTES} bytes", f"data offsets hold {VOCAB * ROW_BYTES}")


def _smaller_false_shape(header, size):
    header[EMBED]["shape"] = [2 * VOCAB, 64]


def _offsets_past_the_end(header, size):
    header[EMBED]["data_offsets"] = [size, size + VOCAB * ROW_BYTES]


def _shared_bytes(header, size):
    p = "model.layers.0.self_attn."
    header[p + "o_proj.weight"]["data_offsets"] = header[p + "q_proj.weight"]["data_offsets"]


def _float_shape(header, size):
    header[EMBED]["shape"] = [float(VOCAB), 64]


def _unknown_dtype(header, size):
    header[EMBED]["dtype"] = "F33"


@pytest.mark.parametrize("edit, config, words", [
    (_smaller_false_shape, {"vocab_size": 2 * VOCAB},
     ["[640, 64]", f"needs {2 * VOCAB * ROW_BYTES} bytes", f"hold {VOCAB * ROW_BYTES}"]),
    (_offsets_past_the_end, {}, ["model.safetensors is truncated"]),
    (_shared_bytes, {}, ["overlaps another tensor"]),
    (_float_shape, {}, ["shape [320.0, 64]"]),
    (_unknown_dtype, {}, ["unknown dtype 'F33'"]),
], ids=["smaller-false-shape", "offsets-past-the-end", "shared-bytes", "float-shape", "unknown-dtype"])
def test_a_header_that_does_not_fit_its_bytes_is_refused(edit, config, words, src, tmp_path, capsys):
    folder = _with_header(src, tmp_path / "bad", edit, **config)
    line = _refused(folder, tmp_path, capsys, f"could not load the weights of {folder}: model.safetensors", *words)
    if edit is _offsets_past_the_end:  # the file's size and the bytes its header asks for, computed here
        size = (folder / "model.safetensors").stat().st_size
        assert line.endswith(f"({size} bytes, its header needs {size + VOCAB * ROW_BYTES})"), line


# --- a layer count beyond the files is refused without growing with the count -----------------------------------------


@pytest.mark.parametrize("model, layers", [("llama-gqa", 10**9), ("llama-gqa", 10**6), ("qwen2", 10**9)],
                         ids=["llama-1e9", "llama-1e6", "qwen2-1e9"])
def test_a_huge_layer_count_is_refused_fast_and_small(model, layers, tiny_models, tmp_path):
    """qwen2's config class builds a list of num_hidden_layers entries: the count is compared with the files first."""
    folder = _edit_config(tiny_models[model], tmp_path / "many", num_hidden_layers=layers)
    line = _refused_cheaply(folder, tmp_path)
    assert line == (f"error: weights of {folder} are incomplete: its config has {layers} layers, the weights hold 2 "
                    "(no tensor model.layers.2.*)")


def _gguf(path: Path, blocks: int) -> Path:
    """A qwen2 GGUF whose metadata claims ``blocks`` layers and whose tensors hold one."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(blocks)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_feed_forward_length(128)
    w.add_context_length(256)
    w.add_tensor("token_embd.weight", np.zeros((VOCAB, 64), np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_block_count_beyond_its_tensors_is_refused_fast_and_small(tmp_path):
    path = _gguf(tmp_path / "many.gguf", 10**9)
    line = _refused_cheaply(path, tmp_path)
    assert line == f"error: weights of {path} are incomplete: its config has {10**9} layers, the weights hold 1 " \
                   "(no tensor blk.1.*)"


# --- malformed config values ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, shown", [
    ("head_dim", 0, "0"),
    ("num_attention_heads", -4, "-4"),
    ("num_key_value_heads", -2, "-2"),
    ("num_key_value_heads", 0, "0"),
    ("hidden_size", 0, "0"),
    ("vocab_size", -1, "-1"),
    ("intermediate_size", 0, "0"),
    ("num_hidden_layers", 0, "0"),
    ("num_hidden_layers", 2.0, "2.0"),
    ("head_dim", "16", "'16'"),
    ("num_attention_heads", True, "True"),
])
def test_a_dimension_that_is_not_a_positive_integer_is_refused(key, value, shown, src, tmp_path, capsys):
    folder = _edit_config(src, tmp_path / "bad", **{key: value})
    line = _refused(folder, tmp_path, capsys)
    assert line == f"error: config of {folder} is invalid: {key} {shown} is not a positive integer"


@pytest.mark.parametrize("theta, shown", [(-1, "-1"), (0, "0"), ("abc", "'abc'"), (float("inf"), "inf"),
                                          (float("nan"), "nan"), (None, None)],
                         ids=["negative", "zero", "text", "infinite", "nan", "absent"])
def test_a_rope_theta_that_is_not_a_positive_finite_number_is_refused(theta, shown, src, tmp_path, capsys):
    """-1 used to reach the RoPE split as complex frequencies (TypeError), 0 a ZeroDivisionError."""
    rope = {"rope_type": "default"} if theta is None else {"rope_type": "default", "rope_theta": theta}
    folder = _edit_config(src, tmp_path / "bad", rope_parameters=rope)
    if theta is None:  # transformers' default theta: converts
        code, err, out = _convert(folder, tmp_path, capsys)
        assert code == 0 and out.is_dir(), err
        return
    line = _refused(folder, tmp_path, capsys)
    assert line == f"error: config of {folder} is invalid: rope_theta {shown} is not a positive finite number"


def test_per_layer_type_rope_thetas_are_checked(tiny_models, tmp_path, capsys):
    """Gemma 3 keeps one RoPE parameter set per layer type."""
    src = tiny_models["gemma3"]
    rope = json.loads((src / "config.json").read_text())["rope_parameters"]
    rope["full_attention"]["rope_theta"] = -5.0
    folder = _edit_config(src, tmp_path / "bad", rope_parameters=rope)
    assert _refused(folder, tmp_path, capsys) == \
        f"error: config of {folder} is invalid: rope_theta -5.0 is not a positive finite number"


def test_frequencies_are_checked_where_the_layout_is_read():
    """A RoPE scaling that gives negative or complex frequencies is refused by the adapter itself."""
    from transformers import AutoConfig

    from convert.adapters import read_layout
    from convert.errors import MLAError

    dims = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2)
    for rope, shown in [({"rope_type": "linear", "factor": -1.0, "rope_theta": 10000.0}, "-1.0"),
                        ({"rope_type": "default", "rope_theta": -1.0}, "j)")]:
        config = AutoConfig.for_model("llama", rope_parameters=rope, **dims)
        with pytest.raises(MLAError, match="invalid RoPE parameters") as err:
            read_layout(config)
        assert shown in str(err.value) and "not a positive finite number" in str(err.value)


def test_a_config_larger_than_its_weights_is_refused(tiny_models, tmp_path, capsys):
    """Phi-3's fused projections have no per-tensor check: the values the config implies are compared in total."""
    folder = _edit_config(tiny_models["phi3"], tmp_path / "bad", intermediate_size=4096)
    held = sum(v for v in _element_counts(folder / "model.safetensors").values())
    least = VOCAB * 64 + 2 * (2 * 4 * 16 * 64 + 3 * 4096 * 64)  # embedding, q and o, gate/up/down; 2 layers
    assert least > held
    _refused(folder, tmp_path, capsys, f"describes at least {least:,} values", f"hold {held:,}")


def _element_counts(path: Path) -> dict[str, int]:
    header, _ = _read_safetensors(path)
    counts = {}
    for name, info in header.items():
        if name != "__metadata__":
            counts[name] = 1
            for n in info["shape"]:
                counts[name] *= n
    return counts


@pytest.fixture(scope="module")
def export(tiny_models, tmp_path_factory):
    """A converted tiny model (budget 0.5), once for this module."""
    from conftest import convert_tiny

    out = tmp_path_factory.mktemp("export") / "mla"
    convert_tiny(tiny_models["llama-gqa"], out, kv_budget=0.5)
    return out


@pytest.mark.parametrize("key, value, words", [
    ("kv_lora_rank", 0, "kv_lora_rank 0 is not a positive integer"),
    ("kv_lora_rank", [22, -1], "kv_lora_rank [22, -1] is not a positive integer"),
    ("qk_rope_head_dim", [-2, 4], "qk_rope_head_dim [-2, 4] is not an integer >= 0"),
    ("v_head_dim", 0, "v_head_dim 0 is not a positive integer"),
    ("num_hidden_layers", 10**6, f"its config has {10**6} layers, the weights hold 2"),
])
def test_an_exports_config_is_checked_too(key, value, words, export, tmp_path, capsys):
    """``mla eval`` (like finetune and bench) loads exports through the same checks."""
    folder = _edit_config(export, tmp_path / "bad", **{key: value})
    before = digest(folder)
    report = tmp_path / "outs" / "report"
    report.parent.mkdir()
    capsys.readouterr()
    code = main(["eval", str(folder), "--out", str(report), "--tasks", "", "--ppl-text", "", "--speed-prompt", "0"])
    one_error(code, capsys.readouterr().err, str(folder), words)
    assert digest(folder) == before and list(report.parent.iterdir()) == []


# --- an unreadable weights file is named as such ----------------------------------------------------------------------


def _convert_with_permissions(folder: Path, out: Path) -> tuple[int, str]:
    proc = subprocess.run([*_permission_bits_apply(), sys.executable, "-m", "convert.cli", "convert", str(folder),
                           str(out), *FAST], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("sharded", [False, True], ids=["model.safetensors", "index"])
def test_an_unreadable_weights_file_is_reported_as_permission_denied(sharded, src, tmp_path):
    folder = _edit_config(src, tmp_path / "m")
    name = "model.safetensors"
    if sharded:
        header, _ = _read_safetensors(folder / name)
        name = "model.safetensors.index.json"
        weight_map = {n: "model.safetensors" for n in header if n != "__metadata__"}
        (folder / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    before = digest(folder)
    out = tmp_path / "outs" / "out"
    out.parent.mkdir()
    (folder / name).chmod(0o000)
    try:
        code, err = _convert_with_permissions(folder, out)
    finally:
        (folder / name).chmod(0o644)
    assert one_error(code, err) == f"error: could not load the weights of {folder}: cannot read {name}: " \
                                   "Permission denied"
    assert digest(folder) == before and list(out.parent.iterdir()) == []
