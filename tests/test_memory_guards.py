"""Settings that cannot fit are refused in one line before anything is allocated: a batch (or local_batch) whose
memory estimate exceeds the device's or host's available memory, a teacher_topk cache kept by every process of a
host, a read budget far beyond a text file's size, integers past what a 64-bit index holds; an allocator failure
that still happens is one ``error:`` line."""

import io
from pathlib import Path

import pytest
import torch

from conftest import converted_with_texts
from convert.config import ConvertConfig, parse_overrides
from convert.data import load_texts, read_budget
from convert.errors import MLAError, run_command
from convert.recover import finetune
from convert.recover import memory, teacher_cache
from convert.recover.config import RecoverConfig

GIB = 2**30


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    """A tiny GQA model converted at budget 0.25, and disjoint training / validation text files (Python docs)."""
    return converted_with_texts(tiny_models, tmp_path_factory.mktemp("guards"))


def _cfg(root: Path, **extra) -> RecoverConfig:
    args = dict(data=str(root / "train.txt"), val_data=str(root / "val.txt"), seq_len=64, batch_size=4,
                tokens=64 * 4, val_tokens=128, eval_every=100, checkpoint_every=100, warmup_steps=0)
    return RecoverConfig(**{**args, **extra})


def _never(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran: the setting was not refused first")
    return fail


def test_memory_check_refuses_exactly_what_exceeds_the_available_memory(monkeypatch):
    """What is still to allocate (the terms not already held) is compared with the available memory: equal fits,
    one byte more is refused, naming both sizes and the setting to lower."""
    terms = {"weights": 700, "gradients": 40, "optimizer": 80, "teacher": 30, "activations": 380, "total": 1230}
    monkeypatch.setattr(memory, "available_bytes", lambda device: 500, raising=False)
    memory.check_memory(terms, torch.device("cpu"), ("weights", "teacher"), "batch_size 4")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 499)
    with pytest.raises(MLAError, match=r"batch_size 4 needs an estimated 500 bytes .*more than the 499 bytes "
                                       r"available on the host"):
        memory.check_memory(terms, torch.device("cpu"), ("weights", "teacher"), "batch_size 4")
    memory.check_memory(terms, torch.device("cpu"), ("weights", "teacher", "optimizer"), "batch_size 4")


def test_host_available_memory_is_memavailable(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:          100000 kB\nMemAvailable:    3000000 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", str(meminfo))
    assert memory.available_bytes(torch.device("cpu")) == 3000000 * 1024


def test_a_batch_that_cannot_fit_is_refused_before_the_data_is_read(setup, monkeypatch):
    """batch_size=1000000 (micro-batches of 1000000 x 64 tokens: their logits alone are 1e6 * 64 * 320 * 4 bytes
    = 76 GiB a copy) is refused right after the student's config is read: no text read, no step run."""
    import convert.recover.recipe as recipe

    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * GIB, raising=False)
    monkeypatch.setattr(recipe, "training_windows", _never("reading the training text"))
    monkeypatch.setattr(recipe, "batch_rows", _never("a training step"))
    with pytest.raises(MLAError, match=r"batch_size 1000000 .* needs an estimated [0-9.]+ GiB .*more than the "
                                       r"64\.0 GiB available .*lower batch_size or micro_batch"):
        finetune(setup / "conv", setup / "huge", _cfg(setup, batch_size=10**6), log=lambda *_: None)
    assert not (setup / "huge").exists()


def test_a_layer_local_stage_that_cannot_fit_is_refused_before_it_runs(setup, monkeypatch):
    """1000 windows of 64 x 64 float32 hidden states, 3 copies (49 MB), on a host with 16 MiB available: refused
    before the stage embeds a window (the distillation's batch of 4 fits)."""
    import convert.recover.local as local

    monkeypatch.setattr(memory, "available_bytes", lambda device: 16 * 2**20, raising=False)
    monkeypatch.setattr(local, "run_local", _never("the layer-local stage"))
    with pytest.raises(MLAError, match=r"layer-local stage .* needs an estimated [0-9]+ MiB .*more than the 16 MiB "
                                       r"available on the host; lower local_tokens"):
        finetune(setup / "conv", setup / "local-huge", _cfg(setup, local_tokens=64 * 1000), log=lambda *_: None)


class _StageDone(Exception):
    pass


def test_local_batch_beyond_the_windows_takes_the_windows(setup, monkeypatch):
    """local_batch=1e9 over 8 windows: steps of 8 windows, local_epochs x 8 / 8 = 2 of them per layer, and the estimate
    of a run with local_batch=8 (it was 1 step and an estimate for 1e9 windows a step). The run stops after the
    stage."""
    import convert.recover.recipe as recipe
    from convert.recover.local import stage_estimate
    from convert.recover.models import load_student

    def stage_only(*args, **kwargs):
        raise _StageDone(run_stage(*args, **kwargs))

    run_stage, said = recipe.run_stage, []
    monkeypatch.setattr(recipe, "run_stage", stage_only)
    with pytest.raises(_StageDone) as done:
        finetune(setup / "conv", setup / "local-batch", _cfg(setup, local_tokens=64 * 8, local_batch=10**9,
                                                              val_data=""), log=said.append)
    local = done.value.args[0]
    assert local["windows"] == 8 and local["steps_per_layer"] == 2
    assert any("2 steps of 8 per layer" in line for line in said), said
    student = load_student(setup / "conv")
    assert stage_estimate(student, student.config, 8, _cfg(setup, local_batch=10**9)) == \
        stage_estimate(student, student.config, 8, _cfg(setup, local_batch=8))
    assert local["memory"]["estimate"] == stage_estimate(student, student.config, 8, _cfg(setup, local_batch=8))


def test_teacher_cache_counts_every_process_of_the_host():
    """gpu-1b-8b.yaml on 8 processes: 1024 steps of 1 window each, so each process keeps at most 1024 windows of
    1024 tokens x (8 x 64 + 4) bytes = 0.5 GiB, 4.03 GiB for the 8 of them: over half of an 8 GiB host."""
    one = 1024 * 1024 * 516
    assert teacher_cache.check_fits(64, 128256, 1024, 1024, host_bytes=8 * GIB) == one
    assert teacher_cache.check_fits(64, 128256, 1024, 1024, host_bytes=2 * 8 * one, processes=8) == 8 * one
    with pytest.raises(MLAError, match=r"teacher_topk=64: the caches of 8 processes, each of up to 1024 windows of "
                                       r"1024, would hold 4\.0 GiB on the host, more than half of its 8\.0 GiB"):
        teacher_cache.check_fits(64, 128256, 1024, 1024, host_bytes=8 * GIB, processes=8)
    with pytest.raises(MLAError, match="the caches of 8 processes"):
        teacher_cache.check_fits(64, 128256, 1024, 1024, host_bytes=2 * 8 * one - 2, processes=8)


def test_teacher_cache_check_of_a_run_counts_the_local_processes(setup, monkeypatch):
    """A launch of 2 processes on this host (LOCAL_WORLD_SIZE), one step of 4 windows: a cache of 4 x 64 x (8 x 8 + 4)
    bytes per process; a host of 3 such caches holds one in half its memory, not two."""
    one = 4 * 64 * (8 * 8 + 4)
    monkeypatch.setattr(teacher_cache, "host_memory", lambda: 3 * one, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(MLAError, match=r"teacher_topk=8: the caches of 2 processes"):
        finetune(setup / "conv", setup / "cache", _cfg(setup, teacher_topk=8), log=lambda *_: None)


def test_a_cpu_allocator_failure_is_one_line(capsys):
    def allocate():
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 17179869184 bytes. "
                           "Error code 12 (Cannot allocate memory)")

    assert run_command(allocate) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory") and "17179869184 bytes" in err[0], err


class _SmallHost(io.RawIOBase):
    """A file whose reads fail as an allocation of more than 64 MiB at once would on a small host."""

    def __init__(self, f):
        self.f = f

    def read(self, n=-1):
        if n < 0 or n > 64 * 2**20:
            raise MemoryError
        return self.f.read(n)

    def close(self):
        self.f.close()


def test_a_read_budget_beyond_the_file_reads_only_the_file(tmp_path, monkeypatch):
    """tokens=2000000000 reads up to 32 GB of a 20-byte file: it asks for what the file holds, not the budget."""
    import convert.data as data

    path = tmp_path / "small.txt"
    path.write_text("a few words of text.")
    opened = data._open_regular
    monkeypatch.setattr(data, "_open_regular", lambda p, spec: _SmallHost(opened(p, spec)))
    assert load_texts(str(path), read_budget(2_000_000_000)) == ["a few words of text."]
    assert load_texts(str(path), read_budget(10**23)) == ["a few words of text."]  # was an OverflowError


@pytest.mark.parametrize("cls, key, flag", [(RecoverConfig, "tokens", "tokens"), (RecoverConfig, "val_tokens",
                                            "val_tokens"), (RecoverConfig, "local_batch", "local_batch"),
                                            (ConvertConfig, "calib_seqs", "--calib-seqs"),
                                            (ConvertConfig, "calib_len", "--calib-len")])
def test_integers_past_64_bits_are_refused(cls, key, flag):
    values = parse_overrides([f"{key}=99999999999999999999999"], cls)
    with pytest.raises(MLAError, match=rf"^{flag} must be at most 9223372036854775807, got 99999999999999999999999$"):
        cls(**values).validate()
