"""The layer-local recovery stage (convert/recover/local.py) and text mixes (convert/data.py: load_sources, mixed_windows)."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import convert_tiny, main_on_one_thread, make_tiny, run_main
from convert.errors import MLAError
from convert.recover import finetune, work_dir
from convert.recover.config import RecoverConfig
from convert.recover.local import LOCAL_CKPT, trained_params

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4-layer tiny GQA Llama converted at budget 0.25, and disjoint training / validation text files."""
    import pydoc_data.topics

    root = tmp_path_factory.mktemp("local")
    topics = list(pydoc_data.topics.topics.values())
    (root / "train.txt").write_text("\n\n".join(topics[: len(topics) // 2]))
    (root / "val.txt").write_text("\n\n".join(topics[len(topics) // 2:]))
    make_tiny(root / "src", "llama-gqa", num_hidden_layers=LAYERS)
    convert_tiny(root / "src", root / "conv", kv_budget=0.25)
    return root


def _args(root: Path, **extra) -> dict:
    args = dict(data=str(root / "train.txt"), val_data=str(root / "val.txt"), seq_len=64, batch_size=4,
                tokens=64 * 4 * 4, val_tokens=256, eval_every=2, checkpoint_every=2, lr=3e-3, warmup_steps=1,
                local_tokens=64 * 32, local_epochs=4.0, local_lr=3e-3)
    args.update(extra)
    return args


def _attention_errors(src: Path, student_folder: Path, ids: torch.Tensor) -> list[float]:
    """Per layer: |attn_student(x) - attn_original(x)|^2 / mean |attn_original(x)|^2 on the original model's hidden
    states x, computed with stock transformers for the original and hooks on full forward passes (not the stage's
    own layer-by-layer runner)."""
    from transformers import AutoModelForCausalLM

    from convert.deepseek import load_mla

    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    student = load_mla(student_folder).float().eval()
    caught = {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(i, out[0]))
             for i, layer in enumerate(original.model.layers)]
    with torch.no_grad():
        hidden = original(input_ids=ids, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    errors = []
    with torch.no_grad():
        for i, layer in enumerate(student.model.layers):
            x = layer.input_layernorm(hidden[i])
            pos = torch.arange(ids.shape[1])[None]
            got = layer.self_attn(x, position_embeddings=student.model.rotary_emb.all(x, pos)[None])[0]
            target = caught[i]
            errors.append(float((got - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()))
    return errors


def _perplexity(folder: Path, windows: torch.Tensor) -> float:
    """exp of the mean next-token NLL over ``windows`` (equal lengths), with stock transformers in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]  # (n, T-1, V)
    return torch.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))).item()


@pytest.fixture(scope="module")
def stage_only(setup):
    """``stage_only(**extra)``: ``(record, OUT)`` of a run whose distillation does nothing (lr ~ 0 for one step), so
    the export holds the layer-local result. Run once per distinct RecoverConfig: tests whose settings are the same
    (given or by default) read the same run."""
    runs = {}

    def run(**extra) -> tuple[dict, Path]:
        cfg = RecoverConfig(**_args(setup, tokens=64 * 4, lr=1e-30, warmup_steps=0, **extra))
        key = json.dumps(asdict(cfg), sort_keys=True, default=str)
        if key not in runs:
            out = setup / f"stage-{len(runs)}"
            runs[key] = finetune(setup / "conv", out, cfg, log=lambda *_: None), out
        return runs[key]

    return run


def test_layer_local_stage_trains_each_attention_towards_the_original(setup, stage_only):
    from convert.deepseek import load_mla
    from convert.recover.local import local_windows
    from convert.recover.windows import training_windows, validation_windows
    from convert.sources import load_tokenizer, resolve_source

    record, out = stage_only()
    record = record["recovery"]
    local = record["local"]
    assert local["done"] == LAYERS and [e["layer"] for e in local["layers"]] == list(range(LAYERS))
    for e in local["layers"]:
        assert e["error_after"] < 0.8 * e["error_before"], e
    # the recorded errors are the ones stock transformers gives on the same windows, before and after
    cfg = RecoverConfig(**_args(setup))
    ids = local_windows(training_windows(load_tokenizer(resolve_source(str(setup / "src"))), cfg), cfg)
    assert len(ids) == local["windows"] == 32
    before = _attention_errors(setup / "src", setup / "conv", ids)
    after = _attention_errors(setup / "src", out, ids)
    assert before == pytest.approx([e["error_before"] for e in local["layers"]], rel=1e-4)
    assert after == pytest.approx([e["error_after"] for e in local["layers"]], rel=1e-4)
    # only the attention projections changed (lr 1e-30 leaves the distillation's targets as they were)
    old, new = load_file(setup / "conv" / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    student = load_mla(setup / "conv")
    expected = {k for i in range(LAYERS) for k in trained_params(student, i, cfg)}
    assert changed == expected and all(".self_attn." in k for k in changed)
    # the validation ratio before the stage is the conversion's perplexity over the original's on the held-out windows
    val = validation_windows(load_tokenizer(resolve_source(str(setup / "src"))), cfg)
    expected = _perplexity(setup / "conv", val) / _perplexity(setup / "src", val)
    assert local["val_ratio_before"] == pytest.approx(expected, rel=1e-4) and record["val"][0]["step"] == 0
    assert not work_dir(out).exists()


def test_local_batch_sets_the_steps_per_layer(setup, stage_only):
    """local_batch: local_epochs x windows / local_batch steps per layer (4 x 32 / 2 = 64; default batch_size 4: 32);
    local_batch equal to batch_size is the default run, step for step."""
    runs = {lb: stage_only(**({} if lb is None else {"local_batch": lb}))[0]["recovery"]["local"]
            for lb in (None, 4, 2)}
    assert [runs[lb]["steps_per_layer"] for lb in (None, 4, 2)] == [32, 32, 64]
    assert runs[4]["layers"] == runs[None]["layers"]
    assert [e["error_after"] for e in runs[2]["layers"]] != [e["error_after"] for e in runs[None]["layers"]]
    with pytest.raises(MLAError, match="local_batch must be >= 1"):
        RecoverConfig(**_args(setup, local_batch=0)).validate()


def test_student_inputs_agree_with_teacher_inputs_on_the_first_layer(stage_only):
    runs = {inputs: stage_only(local_inputs=inputs)[0]["recovery"]["local"]["layers"]
            for inputs in ("teacher", "student")}
    assert runs["teacher"][0] == runs["student"][0]  # layer 0 sees the embeddings either way
    assert runs["teacher"][1]["error_before"] != runs["student"][1]["error_before"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _finetune_argv(setup, out: Path) -> list[str]:
    items = [f"{k}={v}" for k, v in _args(setup, local_tokens=64 * 64, local_epochs=16.0).items()]
    return ["finetune", str(setup / "conv"), str(out), *items]


def _cli(setup, out: Path) -> list[str]:
    return [sys.executable, "-m", "convert.cli", *_finetune_argv(setup, out)]


def test_layer_local_stage_resumes_after_kill_9(setup):
    ref = setup / "ref"
    assert main_on_one_thread(*_finetune_argv(setup, ref)) == 0  # the uninterrupted run, in this process
    out = setup / "killed"
    ckpt = work_dir(out) / LOCAL_CKPT
    proc = subprocess.Popen(_cli(setup, out), env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not ckpt.exists():
        assert proc.poll() is None and time.time() < deadline, "no layer-local checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    done = torch.load(ckpt, weights_only=True)["done"]
    assert 0 < done < LAYERS and not out.exists()
    again = subprocess.run(_cli(setup, out), env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"layer-local stage: resuming from {ckpt} after layer {done}" in again.stdout
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((ref / "mla_conversion.json").read_text())["recovery"]
    rb = json.loads((out / "mla_conversion.json").read_text())["recovery"]
    assert ra["local"]["layers"] == rb["local"]["layers"] and ra["val"] == rb["val"]
    assert not work_dir(out).exists()


@pytest.mark.parametrize("overrides, message", [
    ({"local_inputs": "both"}, "local_inputs must be one of teacher, student"),
    ({"local_tokens": -1}, "local_tokens and local_epochs must be >= 0"),
    ({"local_lr": 0.0}, "local_epochs and local_lr must be > 0 with local_tokens"),
    ({"local_epochs": 0.0}, "local_epochs and local_lr must be > 0 with local_tokens"),
    ({"full_targets": ""}, "local_tokens needs full_targets"),
])
def test_bad_layer_local_settings_are_one_line_errors(setup, tmp_path, overrides, message):
    with pytest.raises(MLAError, match=message):
        finetune(setup / "conv", tmp_path / "out", RecoverConfig(**_args(setup, **overrides)), log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_cli_rejects_bad_layer_local_values(setup, tmp_path, capsys):
    code, err = run_main(capsys, "finetune", setup / "conv", tmp_path / "o", "local_tokens=many")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:")
    assert "local_tokens must be int" in err and not (tmp_path / "o").exists()


# --- text mixes ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(setup):
    from convert.sources import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source(str(setup / "src")))


def test_mixed_windows_split_evenly_in_round_robin(setup, tokenizer, tmp_path):
    from convert.data import load_sources, mixed_windows, token_windows

    (tmp_path / "small.txt").write_text(" ".join(f"item {i}" for i in range(1500)))  # distinct windows
    spec = f"{setup / 'train.txt'},{tmp_path / 'small.txt'}"
    sources = load_sources(spec)
    assert len(sources) == 2
    big, small = (token_windows(tokenizer, docs, 32, None) for docs in sources)
    mixed = mixed_windows(tokenizer, sources, 32, 7, seed=0)
    rows_big = {tuple(r) for r in big.tolist()}
    rows_small = {tuple(r) for r in small.tolist()}
    kinds = ["big" if tuple(r) in rows_big else "small" if tuple(r) in rows_small else "?" for r in mixed.tolist()]
    assert kinds == ["big", "small", "big", "small", "big", "small", "big"]
    every = mixed_windows(tokenizer, sources, 32, None, seed=0)  # as many from each as the smallest has
    assert len(every) == 2 * len(small) and len({tuple(r) for r in every.tolist()} & rows_small) == len(small)
    # one source: exactly token_windows
    one = mixed_windows(tokenizer, sources[:1], 32, 5, seed=3)
    assert torch.equal(one, token_windows(tokenizer, sources[0], 32, 5, seed=3))
    with pytest.raises(MLAError, match="cannot cover a mix of 2"):
        mixed_windows(tokenizer, sources, 32, 1)
    with pytest.raises(MLAError, match="names no source"):
        load_sources(" , ")


def test_mix_all_takes_every_window_interleaved_by_share(setup, tokenizer, tmp_path):
    """data_mix=all: every window of both sources once, each source's windows in their own order, spread so that the
    first n rows hold each source's share of n (within one window)."""
    from convert.data import load_sources, mixed_windows, token_windows

    (tmp_path / "small.txt").write_text(" ".join(f"item {i}" for i in range(1500)))
    sources = load_sources(f"{setup / 'train.txt'},{tmp_path / 'small.txt'}")
    big, small = (token_windows(tokenizer, docs, 32, None) for docs in sources)
    assert len(big) > 2 * len(small)  # the shares differ
    every = mixed_windows(tokenizer, sources, 32, None, seed=0, mix="all")
    rows = [tuple(r) for r in every.tolist()]
    assert sorted(rows) == sorted(map(tuple, big.tolist() + small.tolist()))
    is_small = [r in {tuple(x) for x in small.tolist()} for r in rows]
    assert [r for r, s in zip(rows, is_small) if s] == [tuple(x) for x in small.tolist()]  # stream order kept
    share = len(small) / len(every)
    for n in range(1, len(rows) + 1):
        assert abs(sum(is_small[:n]) - share * n) <= 1
    # a fixed count ignores mix; balanced is the default
    assert torch.equal(mixed_windows(tokenizer, sources, 32, 7, mix="all"), mixed_windows(tokenizer, sources, 32, 7))
    with pytest.raises(MLAError, match="mix must be one of balanced, all"):
        mixed_windows(tokenizer, sources, 32, None, mix="some")


def test_data_mix_all_trains_on_every_window(setup, tmp_path):
    """data_mix=all reaches the run: its recorded training windows count both sources whole."""
    from convert.data import load_sources, token_windows
    from convert.sources import load_tokenizer, resolve_source

    spec = f"pydoc,{setup / 'train.txt'}"
    tok = load_tokenizer(resolve_source(str(setup / "src")))
    counts = [len(token_windows(tok, docs, 64, None)) for docs in load_sources(spec)]
    assert counts[0] != counts[1]
    convert_tiny(setup / "src", tmp_path / "conv", kv_budget=0.25)
    cfg = RecoverConfig(**_args(setup, data=spec, data_mix="all", local_tokens=0, tokens=64 * 4, val_data=""))
    rec = finetune(tmp_path / "conv", tmp_path / "out", cfg, log=lambda *_: None)["recovery"]
    assert rec["data_windows"] == sum(counts)
    with pytest.raises(MLAError, match="data_mix must be one of balanced, all"):
        RecoverConfig(**_args(setup, data_mix="most")).validate()


def test_conversion_and_recovery_on_a_mix(setup, tmp_path, monkeypatch):
    """A mix reaches both stages: the conversion calibrates on windows of each source in turn (4 calibration + 1
    verification window: 3 of the first source, 2 of the second, round robin), and the balanced training set holds as
    many windows of each source as the smaller one has."""
    import convert.pipeline
    from convert.data import load_sources, token_windows
    from convert.sources import load_tokenizer, resolve_source

    spec = f"pydoc,{setup / 'train.txt'}"
    seen = []
    real = convert.pipeline.calibration_data
    monkeypatch.setattr(convert.pipeline, "calibration_data", lambda *a: seen.append(real(*a)) or seen[-1])
    record = convert_tiny(setup / "src", tmp_path / "conv", kv_budget=0.25, calib=spec)
    assert record["calibration"]["data"] == spec
    tok = load_tokenizer(resolve_source(str(setup / "src")))
    every = [token_windows(tok, docs, 64, None).tolist() for docs in load_sources(spec)]
    each = [set(map(tuple, windows)) for windows in every]
    (calib, verify), = seen
    assert calib.shape == (4, 64) and tuple(verify[0].tolist()) in each[0]
    assert len(each[0] & each[1]) < 20  # (a few windows of the same text in both)
    assert [[tuple(row) in windows for windows in each] for row in calib.tolist()] == [[True, False], [False, True]] * 2
    cfg = RecoverConfig(**_args(setup, data=spec, local_tokens=0, tokens=64 * 4 * 2, val_data=""))
    result = finetune(tmp_path / "conv", tmp_path / "out", cfg, log=lambda *_: None)
    assert result["recovery"]["steps"] == 2 and result["recovery"]["data_windows"] == 2 * min(map(len, every))
