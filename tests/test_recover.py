"""Recovery fine-tuning (mla finetune) on a tiny converted model: it learns, exports merged weights equal to the peft
adapter, resumes after kill -9 / Ctrl-C to the same weights as an uninterrupted run, and reports bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import convert_tiny, converted_with_texts, main_on_one_thread
from convert.config import parse_overrides
from convert.errors import MLAError
from convert.recover import CKPT_NAME, finetune, work_dir
from convert.recover.config import RecoverConfig
from convert.recover.losses import lr_at
from convert.recover.windows import batch_rows

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    """A tiny GQA model converted at budget 0.25, and disjoint training / validation text files (Python docs)."""
    return converted_with_texts(tiny_models, tmp_path_factory.mktemp("recover"))


def _args(root: Path, **extra) -> dict:
    args = dict(data=str(root / "train.txt"), val_data=str(root / "val.txt"), seq_len=64, batch_size=4,
                tokens=64 * 4 * 40, val_tokens=256, eval_every=10, checkpoint_every=5, lr=3e-3, warmup_steps=2)
    args.update(extra)
    return args


def _finetune_argv(root: Path, out: Path, extra=(), **kw) -> list[str]:
    items = [f"{k}={v}" for k, v in _args(root, **kw).items()]
    return ["finetune", str(root / "conv"), str(out), *items, *extra]


def _cli(root: Path, out: Path, extra=(), **kw):
    return [sys.executable, "-m", "convert.cli", *_finetune_argv(root, out, extra, **kw)]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted CLI run (the same settings the interrupted runs use), in this process."""
    out = setup / "ref"
    assert main_on_one_thread(*_finetune_argv(setup, out, tokens=64 * 4 * 120)) == 0
    return out


def test_schedule_and_data_order():
    cfg = RecoverConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(99, cfg, 100) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(52, cfg, 100) == pytest.approx(0.55, abs=1e-2)
    # every window is seen once per epoch; a step's rows depend only on (step, seed)
    rows = torch.cat([batch_rows(s, 4, 10, seed=3) for s in range(5)])
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:].tolist()) == list(range(10))
    assert torch.equal(batch_rows(3, 4, 10, seed=3), rows[12:16])
    assert not torch.equal(batch_rows(0, 4, 10, seed=4), rows[:4])


def test_finetune_learns_and_exports_merged_weights_and_adapter(setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mla_modeling.modeling_mla import MLAForCausalLM

    out = setup / "ft"
    record = finetune(setup / "conv", out, RecoverConfig(**_args(setup)), log=lambda *_: None)
    rec = record["recovery"]
    kls = [h["kl"] for h in rec["history"]]
    assert rec["steps"] == 40 and rec["tokens_seen"] == 40 * 4 * 64
    assert sum(kls[-5:]) / 5 < 0.8 * sum(kls[:5]) / 5, kls  # distillation reduces the KL to the teacher
    assert [e["step"] for e in rec["val"]] == [0, 10, 20, 30, 40]
    assert rec["verify"]["val_ppl_reloaded"] == pytest.approx(rec["verify"]["val_ppl_trained"], rel=1e-4)
    assert (out / "recovery.png").exists() and not work_dir(out).exists()
    saved = json.loads((out / "mla_conversion.json").read_text())
    assert saved["recovery"]["final_kl"] == pytest.approx(sum(kls[-10:]) / 10)
    assert saved["budget"] == json.loads((setup / "conv" / "mla_conversion.json").read_text())["budget"]

    # merged export: plain remote-code model, same tensor names as the converted one, weights changed
    before, after = load_file(setup / "conv" / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)
    assert not torch.equal(before["model.layers.0.self_attn.kv_b_proj.weight"],
                           after["model.layers.0.self_attn.kv_b_proj.weight"])
    assert not torch.equal(before["model.layers.1.mlp.down_proj.weight"], after["model.layers.1.mlp.down_proj.weight"])
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    # the adapter is standard peft on top of the converted model and gives the same logits
    base = MLAForCausalLM.from_pretrained(setup / "conv", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.randint(3, 320, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = adapted(input_ids=ids).logits
        got = exported(input_ids=ids).logits
        untrained = MLAForCausalLM.from_pretrained(setup / "conv", dtype=torch.float32).eval()(input_ids=ids).logits
    assert (got - ref).abs().max() < 1e-4
    assert (got - untrained).abs().max() > 1e-3


def _wait_for_checkpoint(proc, ckpt: Path, timeout: float = 120):
    deadline = time.time() + timeout
    while not ckpt.exists():
        assert proc.poll() is None, "the run ended before writing a checkpoint"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def _same_export(a: Path, b: Path):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    ha = json.loads((a / "mla_conversion.json").read_text())["recovery"]
    hb = json.loads((b / "mla_conversion.json").read_text())["recovery"]
    assert [h["loss"] for h in ha["history"]] == [h["loss"] for h in hb["history"]]
    assert ha["val"] == hb["val"]


def _interrupted_run(setup, out: Path, sig: int):
    """Start the reference's command, send ``sig`` once a checkpoint exists; return (command, process, out, err)."""
    cmd = _cli(setup, out, tokens=64 * 4 * 120)
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(proc, work_dir(out) / CKPT_NAME)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return cmd, proc, stdout, stderr


def test_resume_after_kill_9_gives_the_uninterrupted_result(setup, reference):
    out = setup / "killed"
    cmd, _, _, _ = _interrupted_run(setup, out, signal.SIGKILL)
    assert not out.exists()
    step = torch.load(work_dir(out) / CKPT_NAME, weights_only=True)["step"]
    assert 0 < step < 120
    again = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from {work_dir(out) / CKPT_NAME} at step" in again.stdout
    _same_export(reference, out)
    assert not work_dir(out).exists()


def test_ctrl_c_checkpoints_then_resume_refuses_changed_settings(setup, reference):
    out = setup / "interrupted"
    cmd, proc, stdout, stderr = _interrupted_run(setup, out, signal.SIGINT)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted: checkpoint at step" in stdout and not out.exists()
    changed = subprocess.run(_cli(setup, out, tokens=64 * 4 * 120, lr=1e-3), env=_env(), cwd=ROOT,
                             capture_output=True, text=True)
    assert changed.returncode == 2 and "from a different run (changed: lr)" in changed.stderr
    again = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout
    _same_export(reference, out)


# RecoverConfig's fields when checkpoints were first written (before frozen_dtype, shard, lora_lr, teacher_topk,
# data_mix and local_batch), as that version listed them
EARLIER_FIELDS = ("data tokens seq_len batch_size micro_batch lr schedule warmup_steps min_lr_ratio weight_decay "
                  "grad_clip lora_r lora_alpha lora_dropout lora_targets full_targets kd_weight ce_weight temperature "
                  "hidden_weight local_tokens local_epochs local_lr local_inputs teacher val_data val_tokens "
                  "eval_every checkpoint_every seed device precision gradient_checkpointing format").split()


def test_a_checkpoint_of_the_earlier_version_still_resumes():
    """The earlier version fingerprinted every field but checkpoint_every and device: with the settings added since at
    their default (what runs did then), this version computes the same fingerprint; set otherwise, they count."""
    import hashlib
    from dataclasses import asdict

    from convert.recover.checkpoint import run_fingerprint

    inputs = {"the teacher": "abc", "the training text": "def"}
    for cfg in (RecoverConfig(), RecoverConfig(lr=1e-3, tokens=1234, data="pydoc")):
        earlier = {k: v for k, v in asdict(cfg).items() if k in EARLIER_FIELDS and k not in ("checkpoint_every", "device")}
        blob = json.dumps({"cfg": earlier, "inputs": inputs}, sort_keys=True)
        assert run_fingerprint(cfg, inputs) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    for later in ({"teacher_topk": 8}, {"data_mix": "all"}, {"lora_lr": 1e-3}, {"shard": True},
                  {"frozen_dtype": "float32"}, {"local_batch": 2}):
        assert run_fingerprint(RecoverConfig(**later), inputs) != run_fingerprint(RecoverConfig(), inputs)


def test_nonfinite_loss_is_detected(setup, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(setup / "conv", bad)
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.1.self_attn.kv_b_proj.weight"][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MLAError, match=r"loss became nan at step 1; stopped \(no checkpoint was written\)"):
        finetune(bad, tmp_path / "out", RecoverConfig(**_args(setup, val_data="")), log=lambda *_: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"lora_targets": "nope_proj"}, "lora_targets: no linear module named 'nope_proj'"),
    ({"full_targets": "q_proj", "lora_targets": "q_proj"}, "both lora_targets and full_targets"),
    ({"val_data": "TRAIN"}, "is also training data"),
    ({"lr": -1.0}, "lr must be > 0"),
    ({"schedule": "step"}, "schedule must be one of cosine, linear, constant"),
    ({"micro_batch": 9}, "micro_batch must be in"),
])
def test_bad_settings_are_one_line_errors(setup, tmp_path, overrides, message):
    args = _args(setup, **overrides)
    if args.get("val_data") == "TRAIN":
        args["val_data"] = args["data"]
    with pytest.raises(MLAError, match=message):
        finetune(setup / "conv", tmp_path / "out", RecoverConfig(**args), log=lambda *_: None)


def test_overrides_are_typed_and_unknown_keys_named():
    values = parse_overrides(["lr=3e-4", "tokens=1000", "teacher=null", "data=a.txt,b.txt", "micro-batch=2"],
                             RecoverConfig)
    assert values == {"lr": 3e-4, "tokens": 1000, "teacher": None, "data": "a.txt,b.txt", "micro_batch": 2}
    with pytest.raises(MLAError, match="unknown key 'learning_rate'"):
        parse_overrides(["learning_rate=1"], RecoverConfig)
    with pytest.raises(MLAError, match="lr must be float"):
        parse_overrides(["lr=fast"], RecoverConfig)
    with pytest.raises(MLAError, match="not key=value"):
        parse_overrides(["lr"], RecoverConfig)


def test_cli_errors(setup, tmp_path, capsys):
    from convert.cli import main

    assert main(["finetune", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert main(["finetune", str(setup / "conv"), str(tmp_path / "o"), "bogus=1"]) == 2
    recipe = tmp_path / "r.yaml"
    recipe.write_text("recover:\n  learning_rate: 1\n")
    assert main(["finetune", str(setup / "conv"), str(tmp_path / "o"), "--recipe", str(recipe)]) == 2
    recipe.write_text("recover:\n  lr: 0.001\n")  # overrides after --recipe are still overrides
    assert main(["finetune", str(setup / "conv"), str(tmp_path / "o"), "--recipe", str(recipe), "lr_max=1"]) == 2
    assert "unknown key 'lr_max'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_convert_with_recover_recipe_runs_both(tiny_models, setup, tmp_path):
    from convert.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "convert:\n  kv_budget: 0.25\n  calib: pydoc\n  calib_seqs: 4\n  calib_len: 64\n  verify_seqs: 1\n"
        f"recover:\n  data: {setup / 'train.txt'}\n  val_data: {setup / 'val.txt'}\n  seq_len: 64\n"
        "  tokens: 2560\n  val_tokens: 256\n  eval_every: 5\n  lr: 0.003\n")
    out = tmp_path / "out"
    assert main(["convert", str(tiny_models["llama-gqa"]), str(out), "--recipe", str(recipe)]) == 0
    record = json.loads((out / "mla_conversion.json").read_text())
    assert record["budget"]["achieved_kv_budget"] <= 0.25 + 1e-9
    assert record["recovery"]["steps"] == 10 and record["recovery"]["teacher"] == str(tiny_models["llama-gqa"])
    assert (out / "adapter" / "adapter_config.json").exists() and not work_dir(out).exists()


def test_hidden_state_loss_alone_trains(setup, tmp_path):
    record = finetune(setup / "conv", tmp_path / "out",
                      RecoverConfig(**_args(setup, kd_weight=0.0, hidden_weight=1.0, tokens=64 * 4 * 20, val_data="")),
                      log=lambda *_: None)
    hist = record["recovery"]["history"]
    assert all(h["kl"] == 0 for h in hist) and hist[0]["hidden"] > 0
    assert sum(h["hidden"] for h in hist[-5:]) < 0.8 * sum(h["hidden"] for h in hist[:5])
    assert record["recovery"]["val"] == [] and record["recovery"]["verify"]["tokens"] == "random"


def test_teacher_from_a_relative_source_path_works_from_any_folder(tiny_models, setup, tmp_path, monkeypatch):
    src = tiny_models["llama-gqa"]
    monkeypatch.chdir(src.parent)
    record = convert_tiny(src.name, tmp_path / "conv", kv_budget=0.25)  # SRC given as a relative path
    assert record["source"]["spec"] == src.name and record["source"]["resolved"] == str(src.resolve())
    monkeypatch.chdir(tmp_path)
    result = finetune(tmp_path / "conv", tmp_path / "out", RecoverConfig(**_args(setup, tokens=64 * 4 * 2, val_data="")),
                      log=lambda *_: None)
    assert result["recovery"]["teacher"] == str(src.resolve())


def test_gradient_checkpointing_gives_the_same_losses(setup, monkeypatch):
    """gradient_checkpointing=true recomputes activations in the backward pass: each layer runs twice a training step
    (once without it), and the training is the same."""
    import mla_modeling.modeling_mla as m

    runs, forwards, calls, forward = {}, {}, [0], m.MLAAttention.forward

    def counted(self, *a, **k):
        calls[0] += torch.is_grad_enabled()
        return forward(self, *a, **k)

    # the student's attention forwards that record a graph (training ones) are counted (the attention, not the decoder
    # layer: transformers checkpoints the layer's own ``forward``, which must stay in place)
    monkeypatch.setattr(m.MLAAttention, "forward", counted)
    for flag in ("false", "true"):
        out, calls[0] = setup / f"gc-{flag}", 0
        argv = _finetune_argv(setup, out, tokens=64 * 4 * 6, eval_every=100, gradient_checkpointing=flag)
        assert main_on_one_thread(*argv) == 0
        runs[flag] = json.loads((out / "mla_conversion.json").read_text())["recovery"]["history"]
        forwards[flag] = calls[0]
    losses = {flag: [h["loss"] for h in hist] for flag, hist in runs.items()}
    assert len(losses["true"]) == 6
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)
    assert forwards == {"false": 6 * 2, "true": 2 * 6 * 2}  # steps x layers (one micro-batch a step)
