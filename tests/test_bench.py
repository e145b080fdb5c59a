"""``mla bench`` beyond one pair: several (batch, context) pairs, the capacity search, kernels per decode step and the
compiled static-cache decode (not timed: the numbers only have to be consistent; speed is the benchmark's job)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import eval.bench as bench_mod
from conftest import convert_tiny, make_tiny
from convert.cli import main
from convert.errors import MLAError
from eval.bench import BenchConfig, cache_name, largest_batch
from eval.kernels import count_kernels


@pytest.fixture(scope="module")
def half(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "half"
    convert_tiny(tiny_models["llama-gqa"], out, kv_budget=0.5)
    return out


def test_pairs_give_one_block_and_one_json_entry_each(tiny_models, half, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(half), "--baseline", str(tiny_models["llama-gqa"]), "--batch", "1,2", "--context", "16",
                 "--new-tokens", "3", "--runs", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("batch 1 x context 16 (") for line in printed) == 1
    assert sum(line.startswith("batch 2 x context 16 (") for line in printed) == 1
    assert printed[-1].startswith("half: decode ") and "at 1 x 16" in printed[-1] and "at 2 x 16" in printed[-1]
    res = json.loads(out.read_text())
    assert [(p["batch"], p["context"]) for p in res["pairs"]] == [(1, 16), (2, 16)]
    assert res["models"] == res["pairs"][0]["models"]  # where consumers of one pair find it
    record = json.loads((half / "mla_conversion.json").read_text())["kv_cache"]
    for pair in res["pairs"]:
        original, mla = pair["models"]
        assert [original["name"], mla["name"]] == ["original", "half"]
        for row in pair["models"]:
            assert (row["batch"], row["context"], row["cache"], row["compiled"]) == (pair["batch"], 16, "dynamic",
                                                                                     False)
            assert row["kv_cache_mib"] * 2**20 == row["kv_bytes_per_token"] * pair["batch"] * (16 + 3)
            assert row["prefill_peak_mib"] > 0 and row["peak_memory_mib"] > 0
            assert row["kernels_per_step"] > 0 and row["kernels_per_layer"] == row["kernels_per_step"] / 2
        assert mla["kv_bytes_per_token"] == record["mla_bytes_per_token"]
        assert original["kv_bytes_per_token"] == record["original_bytes_per_token"]
        for key, ratio in mla["vs_original"].items():  # against the original of the same pair
            assert ratio == pytest.approx(mla[key] / original[key])
    # the stock model's ops per step do not depend on the batch
    assert res["pairs"][0]["models"][0]["kernels_per_step"] == res["pairs"][1]["models"][0]["kernels_per_step"]


def _step_counter(model):
    """A decode step on a prefilled cache, and the kernel count of one call of it."""
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache, token = getattr(out, cache_name()), out.logits[:, -1:].argmax(-1)
    return lambda: count_kernels(model, lambda: model(input_ids=token, **{cache_name(): cache}, use_cache=True))


def test_kernel_count_is_repeatable_and_grows_by_the_same_amount_per_layer(tmp_path):
    counts = {}
    for layers in (2, 3, 4):
        make_tiny(tmp_path / str(layers), "llama-gqa", num_hidden_layers=layers)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / str(layers), dtype=torch.float32).eval()
        count = _step_counter(model)
        counts[layers] = count()
        assert count() == counts[layers]
    per_layer = counts[3] - counts[2]
    assert per_layer > 0 and counts[4] - counts[2] == 2 * per_layer


def test_kernel_count_leaves_out_views_and_counts_a_linear_once():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 4, 8)
    # a linear on a 3D input: view/reshape/t around one matmul kernel (addmm, or matmul + add)
    n = count_kernels(lin, lambda: lin(x).transpose(1, 2).reshape(2, -1)[:, :3].unsqueeze(0))
    assert 1 <= n <= 2
    assert count_kernels(lin, lambda: x.view(8, 8).t().expand(2, 8, 8).narrow(0, 0, 1)) == 0
    assert count_kernels(lin, lambda: (x * 2 + 1).exp()) == 3


@pytest.mark.parametrize("max_batch", [1, 5, 16, 1024])
def test_largest_batch_doubles_then_bisects(max_batch):
    for limit in [*range(0, 40), max_batch - 1, max_batch, max_batch + 7]:
        tried = []

        def fits(b):
            tried.append(b)
            return b <= limit

        assert largest_batch(fits, max_batch) == max(0, min(limit, max_batch))
        assert len(tried) == len(set(tried)) and all(1 <= b <= max_batch for b in tried)
        assert len(tried) <= 2 * math.ceil(math.log2(max_batch + 1)) + 1


def _fake_child(path, cfg, batch, context, mode="measure", on_line=None):
    """Stand-in for the capacity search's process, with monotone probes: the original runs out of memory above 4
    sequences, the converted model peaks at 100 + 2 * batch MiB (so a 150 MiB limit stops it at 25)."""
    assert mode in ("capacity", "probe") and cfg.capacity
    original = path.endswith("orig")

    def probe(b):
        if original and b > 4:
            return {"batch": b, "context": context, "oom": True, "error": "CUDA out of memory"}
        return {"path": path, "batch": b, "context": context, "decode_tok_s": (10 if original else 12) * b,
                "kv_cache_mib": b * context / (1 if original else 4), "prefill_peak_mib": None,
                "peak_memory_mib": 100 + (10 if original else 2) * b}

    if mode == "probe":  # a CPU: the parent searches, one process per probe
        return probe(batch)
    return {"path": path, "device": "cuda", **bench_mod.search(probe, cfg)}  # CUDA: one process searches


@pytest.mark.parametrize("cuda", [False, True])
def test_capacity_with_a_fake_probe(tmp_path, monkeypatch, capsys, cuda):
    (tmp_path / "orig").mkdir()
    (tmp_path / "half").mkdir()
    monkeypatch.setattr(bench_mod, "_child", _fake_child)
    monkeypatch.setattr(bench_mod, "_device", lambda cfg: "cuda" if cuda else "cpu")
    out = tmp_path / "cap.json"
    assert main(["bench", str(tmp_path / "half"), "--baseline", str(tmp_path / "orig"), "--context", "64,128",
                 "--capacity", "--memory-limit-mib", "150", "--max-batch", "64", "--json", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("half: max batch 25 at 64 (6.25x, decode 7.50x), 25 at 128 (6.25x")
    assert any(line.startswith("largest batch at context 128 (") for line in printed)
    res = json.loads(out.read_text())
    assert [b["context"] for b in res["capacity"]] == [64, 128] and res["models"] == res["capacity"][0]["models"]
    for block in res["capacity"]:
        original, mla = block["models"]
        assert (original["max_batch"], mla["max_batch"]) == (4, 25)
        assert original["batch"] == 4 and mla["batch"] == 25 and mla["context"] == block["context"]
        assert mla["vs_original"]["max_batch"] == 25 / 4 and mla["vs_original"]["decode_tok_s"] == 300 / 40
        assert [p["batch"] for p in original["probes"]] == [1, 2, 4, 8, 6, 5]
        assert [p["fits"] for p in mla["probes"]] == [True] * 5 + [False, True, False, False, True]
        assert "150" in mla["probes"][5]["why"]


def test_json_is_written_as_it_goes(tiny_models, tmp_path, monkeypatch, capsys):
    calls = []

    def child(path, cfg, batch, context, mode="measure"):
        calls.append(batch)
        if len(calls) == 2:
            raise MLAError("the machine went away")
        return {"decode_tok_s": 1.0}

    monkeypatch.setattr(bench_mod, "_child", child)
    out = tmp_path / "partial.json"
    src = str(tiny_models["llama-gqa"])
    assert main(["bench", src, "--batch", "1,2", "--json", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "error: the machine went away"
    res = json.loads(out.read_text())
    assert [len(p["models"]) for p in res["pairs"]] == [1] and res["pairs"][0]["models"][0]["decode_tok_s"] == 1.0


def test_capacity_search_under_a_memory_limit_on_cpu(tiny_models, tmp_path, capsys):
    """Each probe holds a cache of batch x 262144 random tokens (2 layers x 2 KV heads x 16 x (K + V) x 4 bytes =
    128 MiB a sequence) and decodes on it, each in a fresh process. The peaks of batches 1-3 are measured by a search
    without a limit first;
    a limit midway between those of batch 2 and 3 must then stop the search at 2."""
    src = str(tiny_models["llama-gqa"])
    args = ["bench", src, "--context", "262144", "--new-tokens", "2", "--runs", "1", "--capacity", "--max-batch", "3"]
    out = tmp_path / "free.json"
    assert main([*args, "--json", str(out)]) == 0
    free = json.loads(out.read_text())["capacity"][0]["models"][0]
    peaks = {p["batch"]: p["peak_memory_mib"] for p in free["probes"]}
    assert free["max_batch"] == 3 and sorted(peaks) == [1, 2, 3]
    per_sequence = 2 * 2 * 16 * 2 * 4 * (262144 + 2) / 2**20  # what each sequence adds to the cache
    assert free["kv_cache_mib"] == pytest.approx(3 * per_sequence)
    assert peaks[3] - peaks[2] > 0.5 * per_sequence and peaks[2] - peaks[1] > 0.5 * per_sequence, peaks
    limit = (peaks[2] + peaks[3]) / 2
    out = tmp_path / "cap.json"
    assert main([*args, "--memory-limit-mib", f"{limit:.1f}", "--json", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"{tiny_models['llama-gqa'].name}: max batch 2 ")
    row = json.loads(out.read_text())["capacity"][0]["models"][0]
    assert row["max_batch"] == 2 and row["batch"] == 2 and row["peak_memory_mib"] <= limit
    assert [(p["batch"], p["fits"]) for p in row["probes"]] == [(1, True), (2, True), (3, False)]


def test_a_probe_peak_is_its_own_not_its_parents():
    """A probe process started by a large one measures its own resident peak: a child of a process holding 1.5 GiB
    more reports about its own size (importing torch: well under 1.5 GiB), though ``ru_maxrss`` inherits the parent's
    peak there (the capacity search read the parent's size as every probe's peak)."""
    import subprocess
    import sys

    from conftest import ROOT

    held = bytearray(3 * 2**29)  # 1.5 GiB, touched
    held[::4096] = b"x" * len(held[::4096])
    code = ("import resource, eval.bench as b; b._reset_peak(False); "
            "print(b._peak_mib(False), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    own, inherited = map(float, out.split())
    del held
    assert inherited >= 1536  # the parent's peak, as getrusage sees it in the child
    assert own < 1024, own


def test_chunked_prefill_caches_what_one_prefill_does(tiny_models):
    """Fed 16 tokens at a time, the model holds the cache of one 40-token prefill (every layer's keys and values
    within 1e-5) and continues with the same next-token logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama-gqa"], dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    name = cache_name()
    with torch.no_grad():
        cache, token = bench_mod.chunked_prefill(model, ids, chunk=16)
        whole = model(input_ids=ids, use_cache=True)
        ref = getattr(whole, name)
        assert cache.get_seq_length() == 40 and torch.equal(token, whole.logits[:, -1:].argmax(-1))
        for got, want in zip(cache.layers, ref.layers):
            torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=0)
        step = model(input_ids=token, **{name: cache}).logits
        torch.testing.assert_close(step, model(input_ids=token, **{name: ref}).logits, atol=1e-5, rtol=0)


def test_bench_bad_input(half, capsys):
    for args, message in [(["--batch", "0,1"], "--batch"), (["--context", "8,x"], "--context"),
                          (["--capacity", "--memory-limit-mib", "0"], "--memory-limit-mib"),
                          (["--memory-limit-mib", "100"], "--memory-limit-mib"),
                          (["--capacity", "--max-batch", "0"], "--max-batch"),
                          (["--capacity", "--compile"], "--capacity"),
                          (["--absorbed", "flash"], "--absorbed")]:
        assert main(["bench", str(half), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and len(err.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("which", ["source", "export"])
def test_compiled_static_decode_equals_eager(tiny_models, half, which):
    """The compiled static-cache step (explicit positions) gives the logits of the eager dynamic-cache step, on the
    stock model and on our export (its MLAStaticLayer). The prompt is longer than the export's absorbed query block
    (16), as the benchmark's are."""
    from eval.perplexity import load_model

    model, _ = load_model(str(tiny_models["llama-gqa"] if which == "source" else half))
    cfg = BenchConfig(context=20, new_tokens=4, compile=True)
    prompt = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        from transformers.cache_utils import StaticCache

        static = StaticCache(config=model.config, max_cache_len=24)
        _, cache, first = bench_mod._prefill(model, prompt, static, 2, lambda: None)
        assert cache is static
        step = bench_mod._step_fn(model, cache, 20, cfg, cuda=False)
        out = model(input_ids=prompt, use_cache=True)
        dynamic, token = getattr(out, cache_name()), first
        assert torch.equal(first, out.logits[:, -1:].argmax(-1))
        for i in range(4):
            a = step(token, i).logits[:, -1]
            b = model(input_ids=token, **{cache_name(): dynamic}, use_cache=True).logits[:, -1]
            assert (a - b).abs().max().item() < 1e-4
            token = b.argmax(-1, keepdim=True)


@pytest.mark.slow
def test_compiled_bench_of_an_export_and_its_source(tiny_models, half, tmp_path):
    out = tmp_path / "compiled.json"
    assert main(["bench", str(half), "--baseline", str(tiny_models["llama-gqa"]), "--batch", "2", "--context", "24",
                 "--new-tokens", "4", "--runs", "2", "--compile", "--json", str(out)]) == 0
    original, mla = json.loads(out.read_text())["models"]
    record = json.loads((half / "mla_conversion.json").read_text())["kv_cache"]
    for row in (original, mla):
        assert row["cache"] == "static" and row["compiled"] and row["decode_tok_s"] > 0 and row["kernels_per_step"] > 0
        assert row["compile_s"] > max(row["decode_runs_s"])  # the first run compiles
    # the static cache of the export holds the latent only: the bytes per token of the dynamic one
    assert mla["kv_bytes_per_token"] == record["mla_bytes_per_token"]
    assert original["kv_bytes_per_token"] == record["original_bytes_per_token"]
