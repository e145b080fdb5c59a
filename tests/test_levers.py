"""The recovery levers of issue 26 on a tiny converted model: the top-k teacher cache (its KL against the full one
and a hand-computed coarsened KL; a cached run's losses against an uncached one), per-group learning rates (the
first AdamW step moves each group by its own rate) and all-parameter training (no adapter; the MLP changes)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from conftest import convert_tiny
from convert.errors import MLAError
from convert.recover import finetune
from convert.recover.config import RecoverConfig
from convert.recover.losses import topk_kl, topk_targets
from convert.recover.recipe import Recovery
from convert.recover.teacher_cache import TeacherCache, check_fits
from convert.recover.models import read_record


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    import pydoc_data.topics

    root = tmp_path_factory.mktemp("levers")
    topics = list(pydoc_data.topics.topics.values())
    (root / "train.txt").write_text("\n\n".join(topics)[:1200])  # a few windows: 6 steps of 4 pass them twice
    (root / "val.txt").write_text("\n\n".join(topics[len(topics) // 2:]))
    convert_tiny(tiny_models["llama-gqa"], root / "conv", kv_budget=0.25)
    return root


def _cfg(root: Path, **extra) -> RecoverConfig:
    args = dict(data=str(root / "train.txt"), val_data=str(root / "val.txt"), seq_len=64, batch_size=4,
                tokens=64 * 4 * 6, val_tokens=256, eval_every=100, checkpoint_every=100, lr=3e-3, warmup_steps=0,
                schedule="constant")
    return RecoverConfig(**{**args, **extra})


def test_topk_kl_is_the_kl_of_the_coarsened_distributions():
    torch.manual_seed(0)
    vocab, k, temp = 11, 3, 1.7
    teacher, student = torch.randn(5, vocab) * 3, torch.randn(5, vocab) * 3
    full = F.kl_div(F.log_softmax(student / temp, -1), F.log_softmax(teacher / temp, -1), log_target=True,
                    reduction="batchmean") * temp**2
    assert float(topk_kl(student, topk_targets(teacher, vocab, temp), temp)) == pytest.approx(float(full), rel=1e-5)
    # by hand in float64: the teacher's k likeliest tokens, and one bucket for the rest of each distribution
    p, q = torch.softmax(teacher.double() / temp, -1), torch.softmax(student.double() / temp, -1)
    total = 0.0
    for i in range(5):
        top = sorted(range(vocab), key=lambda j: -float(p[i, j]))[:k]
        pk, qk = [float(p[i, j]) for j in top], [float(q[i, j]) for j in top]
        pk.append(1 - sum(pk))
        qk.append(1 - sum(qk))
        total += sum(a * math.log(a / b) for a, b in zip(pk, qk))
    got = topk_kl(student, topk_targets(teacher, k, temp), temp)
    assert float(got) == pytest.approx(total / 5 * temp**2, rel=1e-4)
    assert float(got) < float(full)  # coarsening never adds divergence (data processing inequality)


def test_teacher_cache_put_gives_what_lookup_gives_later_and_keeps_rows_apart():
    """put's targets are those a later lookup of the same rows returns, bit for bit (topk_targets of the logits), and
    each kept row owns its storage (one row does not keep its whole batch alive)."""
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))  # (B, T, V)
    cache = TeacherCache(4, 2.0)
    put = cache.put([7, 8, 9], logits, "cpu")
    expected = [t.flatten(0, 1) for t in topk_targets(logits, 4, 2.0)]
    assert all(torch.equal(a, b) for a, b in zip(put, expected, strict=True))
    assert cache.lookup([9, 7], "cpu") is not None and cache.lookup([9, 6], "cpu") is None
    again = cache.lookup([7, 8, 9], "cpu")
    assert all(torch.equal(a, b) for a, b in zip(again, put, strict=True))
    values, ids, rest = cache.rows[8]
    assert values.untyped_storage().nbytes() == 5 * 4 * 4 and ids.dtype == torch.int32 and rest.shape == (5,)
    assert cache.nbytes() == 3 * 5 * (8 * 4 + 4) and (cache.hits, cache.misses) == (5, 3)


def test_teacher_cache_run_matches_the_uncached_run_and_skips_the_teacher(setup, capsys):
    vocab = json.loads((setup / "conv" / "config.json").read_text())["vocab_size"]
    # 6 steps of 4 windows over a text of fewer windows: later epochs reuse the cache
    plain = finetune(setup / "conv", setup / "plain", _cfg(setup), overwrite=True)["recovery"]["history"]
    cached = finetune(setup / "conv", setup / "cached", _cfg(setup, teacher_topk=vocab), overwrite=True)
    said = capsys.readouterr().out
    for a, b in zip(plain, cached["recovery"]["history"], strict=True):
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-7)
    n_windows = int(said.split("train.txt (")[1].split(" windows")[0])
    passes = 6 * 4
    assert 4 <= n_windows < passes
    assert f"{passes - n_windows} of {passes} window passes distilled from it" in said


def test_lora_lr_moves_each_group_by_its_own_rate(setup):
    """Adam's first step moves every element with a gradient by the group's rate (m / sqrt(v) = sign(g))."""
    cfg = _cfg(setup, lr=1e-4, lora_lr=2e-3, weight_decay=0.0, grad_clip=0.0, val_data="")
    cfg.validate()
    record = read_record(setup / "conv")
    run = Recovery(setup / "conv", setup / "unused", record, record["source"]["resolved"], cfg, True, True,
                   setup / "ckpt", print)
    run.setup(), run.load_models(), run.load_data(), run.wrap_student(), run.resume(), run.prepare()
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    run.t_run, run.steps_run = 0.0, 0
    run.train_step(0, tqdm(disable=True))
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in run.model.named_parameters() if p.requires_grad}
    lora = [v for n, v in moved.items() if "lora_B" in n]
    full = [v for n, v in moved.items() if "modules_to_save" in n and n.endswith("weight")]
    assert lora and full
    assert all(v == pytest.approx(2e-3, rel=1e-2) for v in lora)
    assert all(v == pytest.approx(1e-4, rel=1e-2) for v in full)  # float32 rounding of weights near 1


def test_all_parameter_training_has_no_adapter_and_trains_the_mlp(setup):
    targets = "q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj,gate_proj,up_proj,down_proj,norm"
    record = finetune(setup / "conv", setup / "allp", _cfg(setup, lora_targets="", full_targets=targets),
                      overwrite=True)["recovery"]
    assert not (setup / "allp" / "adapter").exists() and record["adapter"] is None
    before, after = load_file(setup / "conv" / "model.safetensors"), load_file(setup / "allp" / "model.safetensors")
    expected = sum(t.numel() for n, t in before.items() if any(f"{m}.weight" in n for m in targets.split(","))
                   or n.endswith("norm.weight"))
    assert record["trainable_parameters"] == expected
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == ("embed_tokens" not in name), name  # everything trained moved; the embeddings did not


@pytest.mark.parametrize("overrides, words", [
    ({"teacher_topk": 8, "hidden_weight": 1.0}, "teacher_topk caches the teacher's logits only"),
    ({"lora_lr": 1e-3, "lora_targets": ""}, "lora_lr without lora_targets"),
    ({"teacher_topk": -1}, "teacher_topk must be >= 0"),
    ({"lora_lr": 0.0}, "lr and lora_lr must be > 0"),
])
def test_lever_settings_errors(overrides, words):
    with pytest.raises(MLAError, match=words):
        RecoverConfig(**overrides).validate()


def test_a_cache_larger_than_half_the_host_is_refused():
    # 663 windows of 512, k = 64: 663 * 512 * (8 * 64 + 4) bytes; k beyond the vocabulary counts as vocab - 1
    assert check_fits(64, 49152, 663, 512, host_bytes=2**40) == 663 * 512 * 516
    assert check_fits(10**6, 100, 10, 8, host_bytes=2**40) == 10 * 8 * (8 * 99 + 4)
    with pytest.raises(MLAError, match=r"teacher_topk=64: the cache of 663 windows of 512 would hold 0.2 GiB on the "
                                       r"host, more than half of its 0.3 GiB; lower teacher_topk"):
        check_fits(64, 49152, 663, 512, host_bytes=663 * 512 * 516 * 2 - 2)
