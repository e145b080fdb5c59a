"""Conversion of tiny random models: lossless at budget 1, cache size, generate parity, export behaviour."""

import json
import sys
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from conftest import TINY, assembled_reference_error, calibrate_tiny, convert_tiny, write_tiny_gguf
from convert.config import ConvertConfig

TOL = 1e-4  # fp32 logits, lossless conversions


def _load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32, **kw).eval()


def _ids(batch=2, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (batch, length), generator=g)


@pytest.mark.parametrize("name", list(TINY))
def test_budget_one_is_lossless(name, tiny_models, lossless):
    src = AutoModelForCausalLM.from_pretrained(tiny_models[name], dtype=torch.float32).eval()
    mla = _load(lossless[name])
    ids = _ids()
    with torch.no_grad():
        ref, got = src(ids).logits, mla(ids).logits
    assert (ref - got).abs().max().item() < TOL
    record = json.loads((lossless[name] / "mla_conversion.json").read_text())
    assert record["verify"]["max_abs_logit_diff"] < TOL
    assert record["kv_cache"]["ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mqa", "qwen2", "mistral"])
def test_cached_decode_matches_full_forward(name, lossless):
    """Prefill + token-by-token decode on the latent cache (absorbed path) equals one full forward."""
    mla = _load(lossless[name])
    ids = _ids(length=24)
    with torch.no_grad():
        full = mla(ids, use_cache=False).logits
        out = mla(ids[:, :16], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(16, 24):
            out = mla(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() < TOL


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.3125])
def test_cache_holds_only_latent_and_rope_key(tiny_models, tmp_path, budget):
    out = tmp_path / "m"
    record = convert_tiny(tiny_models["llama-gqa"], out, kv_budget=budget)
    mla = _load(out)
    cfg = mla.config
    ids = _ids(batch=3, length=20)
    with torch.no_grad():
        cache = mla(ids, use_cache=True).past_key_values
    per_token_layer = []
    for i, layer in enumerate(cache.layers):
        held = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        assert layer.keys.shape == (3, 1, 20, cfg.layer_kv_lora_rank(i))
        assert layer.values.shape == (3, 1, 20, cfg.layer_rope_dim(i))
        per_token_layer.append(held / (3 * 20))
        assert held / (3 * 20) == (cfg.layer_kv_lora_rank(i) + cfg.layer_rope_dim(i)) * 4
    original = 2 * 2 * 16 * 4  # 2 * g * d_h * fp32 bytes
    assert sum(per_token_layer) == record["kv_cache"]["mla_bytes_per_token"]
    # the budget is exact on average over layers (ranks are allocated per layer)
    assert sum(per_token_layer) == round(budget * 2 * 2 * 16) * 4 * len(per_token_layer)
    assert record["budget"]["achieved_kv_budget"] == sum(per_token_layer) / (original * len(per_token_layer))


def _generate(model, inputs, **kw):
    """Greedy ``generate`` with the logits of every step: (sequences, logits (batch, steps, vocab))."""
    out = model.generate(**inputs, **kw, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


def test_generate_parity_greedy_and_left_padding(tiny_models, lossless):
    """Every decoding step's logits (latent cache, left padding) equal the source's at budget 1, where the conversion
    is exact; each row alone (no padding) has the logits it has in the padded batch."""
    from transformers import AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(tiny_models["llama-gqa"], dtype=torch.float32).eval()
    mla = _load(lossless["llama-gqa"])
    tok = AutoTokenizer.from_pretrained(lossless["llama-gqa"])
    tok.padding_side = "left"
    texts = ["The class statement", "A function definition is an executable statement that"]
    batch = tok(texts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    ref, ref_logits = _generate(src, batch, **kw)
    got, got_logits = _generate(mla, batch, **kw)
    assert got_logits.shape == (2, 12, 320) and (got_logits - ref_logits).abs().max().item() < TOL
    assert torch.equal(ref, got)
    for row in range(2):
        alone, alone_logits = _generate(mla, tok([texts[row]], return_tensors="pt"), **kw)
        assert (alone_logits[0] - got_logits[row]).abs().max().item() < TOL
        assert torch.equal(alone[0, -12:], got[row, -12:])


def test_generate_sampling(tiny_models, lossless):
    """Sampling (top-k, temperature) draws what a plain sampler draws from the source's logits with the same seed:
    full forwards (no cache) of the original, temperature, top-k, softmax and one multinomial draw a step; the raw
    logits of every step are the source's."""
    mla = _load(lossless["qwen2"])
    src = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float32).eval()
    ids = _ids(batch=2, length=8)
    kw = dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(0)
    a, steps = _generate(mla, {"input_ids": ids}, **kw)
    torch.manual_seed(0)
    b = mla.generate(ids, **kw)
    torch.manual_seed(0)
    want, want_steps = ids, []
    with torch.no_grad():
        for _ in range(6):
            want_steps.append(src(want, use_cache=False).logits[:, -1])
            scores = want_steps[-1] / 0.9
            scores[scores < scores.topk(20).values[:, -1:]] = -float("inf")
            want = torch.cat([want, torch.multinomial(scores.softmax(-1), 1)], 1)
    assert 2 not in want[:, 8:]  # no end of sequence drawn: nothing padded after it
    assert a.shape == (2, 14) and torch.equal(a, want) and torch.equal(a, b)
    assert (steps - torch.stack(want_steps, 1)).abs().max().item() < TOL


def test_labels_loss_backward_and_gradient_checkpointing(lossless):
    """The loss with labels is the shifted cross-entropy; with gradient checkpointing on, each layer's attention runs
    again in the backward pass and the gradient is the loss's derivative (a central difference in float64)."""
    mla = _load(lossless["llama-gqa"])
    ids = _ids(batch=2, length=16)
    ref = mla(ids, labels=ids).loss
    manual = torch.nn.functional.cross_entropy(mla(ids).logits[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
    assert abs(ref.item() - manual.item()) < 1e-5
    mla.train()
    mla.gradient_checkpointing_enable()
    calls = []
    mla.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    loss = mla(ids, labels=ids).loss
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2  # recomputed in the backward pass: checkpointing is on
    grad = mla.model.layers[0].self_attn.kv_b_proj.weight.grad.double()
    assert abs(loss.item() - ref.item()) < 1e-4

    def shifted_ce(model):
        logits = model(ids).logits[:, :-1].reshape(-1, 320).double()
        return torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1)).item()

    apart = _load(lossless["llama-gqa"]).double()
    weight = apart.model.layers[0].self_attn.kv_b_proj.weight
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps, start = 1e-3, weight.detach().clone()
    with torch.no_grad():
        weight.copy_(start + eps * direction)
        plus = shifted_ce(apart)
        weight.copy_(start - eps * direction)
        minus = shifted_ce(apart)
    assert (grad * direction).sum().item() == pytest.approx((plus - minus) / (2 * eps), rel=1e-3)


def test_sdpa_eager_bf16(tiny_models, lossless):
    """sdpa == eager in float32; in bfloat16 the logits (and every step of a greedy decode) are within two bf16
    epsilons of the logits' scale of the float32 source's."""
    ids = _ids(batch=2, length=16)
    sdpa = _load(lossless["llama-mha"], attn_implementation="sdpa")
    eager = _load(lossless["llama-mha"], attn_implementation="eager")
    with torch.no_grad():
        a, b = sdpa(ids).logits, eager(ids).logits
    assert (a - b).abs().max().item() < TOL
    bf16 = AutoModelForCausalLM.from_pretrained(lossless["llama-mha"], trust_remote_code=True, dtype=torch.bfloat16)
    with torch.no_grad():
        c = bf16(ids).logits.float()
    tol = 2 * torch.finfo(torch.bfloat16).eps * a.abs().max().item()  # 2 * 2**-7 * ~1.1
    assert c.dtype == torch.float32 and (a - c).abs().max().item() < tol
    out, steps = _generate(bf16, {"input_ids": ids}, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 20)
    src = AutoModelForCausalLM.from_pretrained(tiny_models["llama-mha"], dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.stack([src(out[:, : 16 + t], use_cache=False).logits[:, -1] for t in range(4)], 1)
    assert (steps.float() - want).abs().max().item() < tol


def test_auto_classes_and_save_pretrained_round_trip(lossless, tmp_path):
    path = lossless["llama-gqa"]
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert config.model_type == "mla_retrofit" and config.q_lora_rank is None
    base = AutoModel.from_pretrained(path, trust_remote_code=True)
    assert type(base).__name__ == "MLAModel"
    mla = _load(path)
    mla.save_pretrained(tmp_path / "again")
    again = _load(tmp_path / "again")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(mla(ids).logits, again(ids).logits)


def test_export_is_self_contained_when_copied(lossless, tiny_models, tmp_path):
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(lossless["qwen2"], copy)
    files = {p.name for p in copy.iterdir()}
    assert {"config.json", "configuration_mla.py", "modeling_mla.py", "model.safetensors", "mla_conversion.json",
            "generation_config.json", "tokenizer.json"} <= files
    assert not any(name.startswith(".") for name in files)
    config = json.loads((copy / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mla.MLAForCausalLM"
    for name in ("configuration_mla.py", "modeling_mla.py"):
        text = (copy / name).read_text()
        imports = {line.split()[1].split(".")[0] for line in text.splitlines() if line.startswith(("import ", "from "))}
        assert imports - sys.stdlib_module_names <= {"torch", "transformers", "configuration_mla"}, imports
    ids = _ids()
    with torch.no_grad():  # the copy alone (lossless export) computes what the source does
        source = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float32).eval()
        torch.testing.assert_close(_load(copy)(ids).logits, source(ids).logits, atol=1e-4, rtol=0)


def test_sliding_window_is_carried_over(lossless):
    config = json.loads((lossless["mistral"] / "config.json").read_text())
    assert config["sliding_window"] == 8 and set(config["layer_types"]) == {"sliding_attention"}


def test_conversion_is_deterministic(tiny_models, tmp_path):
    from safetensors.torch import load_file

    convert_tiny(tiny_models["llama-gqa"], tmp_path / "a", kv_budget=0.3125, seed=3)
    convert_tiny(tiny_models["llama-gqa"], tmp_path / "b", kv_budget=0.3125, seed=3)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_assembled_latent_is_the_reference_at_every_rank(tiny_models, tmp_path):
    """From nearly full rank to a small one (56, 40, 24, 8; RoPE 8) each head's no-RoPE key map and value map in the
    assembled layers of the GQA llama are those of ``conftest.reference_factorization`` of its rotated problem."""
    reader, layout, stats = calibrate_tiny(tiny_models["llama-gqa"], tmp_path)[:3]
    for factor in ("fisher", "pca"):
        for rank in (56, 40, 24, 8):
            cfg = ConvertConfig(kv_lora_rank=rank, rope_dim=8, factor_method=factor)
            assert assembled_reference_error(reader, layout, stats, cfg) < 1e-5, (factor, rank)


def test_sharded_export(tiny_models, tmp_path):
    from safetensors.torch import load_file

    from convert.save import save_state_dict

    state = {f"w{i}": torch.randn(64, 64) for i in range(4)}
    names = save_state_dict(state, tmp_path, max_shard_size="20KB")  # 16 KiB a tensor: one tensor a shard
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(names) == 4 and sorted(index["weight_map"]) == sorted(state)
    assert index["metadata"]["total_size"] == 4 * 64 * 64 * 4
    read = {}
    for name in sorted(set(index["weight_map"].values())):  # read back through the index, as transformers does
        read.update(load_file(tmp_path / name))
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    assert all(name in load_file(tmp_path / index["weight_map"][name]) for name in state)


def test_gguf_source_converts_as_its_safetensors(tiny_models, tmp_path, monkeypatch):
    """A GGUF source (the tiny Llama written as llama.cpp writes one: F32, its tensor names, q/k rows permuted, its
    tokenizer) converts to the export that the same weights give from safetensors: the same ranks and RoPE pairs,
    the same tensors and logits. The conversion parses the file once (config, tokenizer, weight check and weights)."""
    import gguf
    from safetensors.torch import load_file

    gguf_file = write_tiny_gguf(tiny_models["llama-gqa"], tmp_path / "gguf" / "tiny.gguf")
    opened, reader = [], gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, *a, **k: opened.append(path) or reader(path, *a, **k))
    a = convert_tiny(gguf_file, tmp_path / "from-gguf")
    assert opened == [str(gguf_file)]
    b = convert_tiny(tiny_models["llama-gqa"], tmp_path / "from-safetensors")
    assert a["source"]["spec"] == str(gguf_file) and a["ranks"] == b["ranks"]
    wa, wb = load_file(tmp_path / "from-gguf" / "model.safetensors"), load_file(tmp_path / "from-safetensors" /
                                                                              "model.safetensors")
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    ids = _ids()
    with torch.no_grad():
        got, want = _load(tmp_path / "from-gguf")(ids).logits, _load(tmp_path / "from-safetensors")(ids).logits
    assert (got - want).abs().max().item() < TOL


def test_a_gguf_is_parsed_once_per_file_version(tiny_models, tmp_path):
    """One reader per file version (path, size, modification time): asked again, the same one; the file rewritten,
    a new one; and the weights read (the last use), it is let go."""
    import os

    import gguf

    from convert.gguf_memo import gguf_reader, shared_gguf
    from convert.sources import load_weights, resolve_source

    path = write_tiny_gguf(tiny_models["llama-gqa"], tmp_path / "tiny.gguf")
    first = gguf_reader(path)
    assert gguf_reader(path) is first
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    second = gguf_reader(path)
    assert second is not first and gguf_reader(path) is second
    load_weights(resolve_source(str(path)))
    assert gguf_reader(path) is not second
    original = gguf.GGUFReader
    with shared_gguf():
        patched = gguf.GGUFReader
        with shared_gguf():  # re-entrant: an inner scope changes nothing
            assert gguf.GGUFReader is patched
        assert gguf.GGUFReader is patched is not original
    assert gguf.GGUFReader is original
