"""The DeepSeek-V3 serving format (issue 15, first part): one of our MLA models under the format's constraints
(uniform ranks, every c-th RoPE frequency, a latent norm) equals stock ``DeepseekV3ForCausalLM`` on the mapped
weights; what the format cannot express is a one-line MLAError."""

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from convert.deepseek import deepseek_v3_tensors
from convert.errors import MLAError
from mla_modeling.configuration_mla import MLAConfig
from mla_modeling.modeling_mla import CACHE_ARG, CACHE_FIELD, MLAForCausalLM

TOL = 1e-4  # fp32 logits


def _mla(**overrides) -> MLAForCausalLM:
    """A tiny random MLA model (head_dim 16: RoPE width 8 keeps source frequencies 0, 2, 4, 6 of 8)."""
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=16,
              v_head_dim=16, rope_freq_indices=[[0, 2, 4, 6]] * 2, kv_a_layernorm=True, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
              max_position_embeddings=256)
    kw.update(overrides)
    torch.manual_seed(0)
    model = MLAForCausalLM(MLAConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "q_proj" in name or "kv_a_proj" in name:
                p.mul_(8.0)
    return model


def _cached_decode(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of ``ids`` from a ``prompt``-token prefill, then one token at a time on the model's own cache."""
    out = model(ids[:, :prompt], use_cache=True)
    steps, cache = [out.logits], out[CACHE_FIELD]  # stock DeepSeek-V3 names it like our model does
    for t in range(prompt, ids.shape[1]):
        out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_ARG: cache})
        cache = out[CACHE_FIELD]
        steps.append(out.logits)
    return torch.cat(steps, 1)


def test_mla_with_format_constraints_equals_stock_deepseek_v3():
    mla = _mla()
    config, tensors = deepseek_v3_tensors(mla.config, mla.state_dict())
    assert config.model_type == "deepseek_v3" and config.q_lora_rank is None
    assert config.first_k_dense_replace == 2 and config.num_key_value_heads == 4 and not config.tie_word_embeddings
    ds = DeepseekV3ForCausalLM(config).eval()
    ds.load_state_dict(tensors, strict=True)  # every tensor name and shape as the stock model has them
    ids = torch.randint(3, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = mla(ids).logits, ds(ids).logits
        decoded = _cached_decode(ds, ids, 30)  # decoding on the stock model's own cache gives the same logits too
    assert (ref - got).abs().max().item() < TOL
    assert (decoded - ref).abs().max().item() < TOL


@pytest.mark.parametrize("overrides, words", [
    ({"kv_a_layernorm": False}, "latent"),
    ({"kv_lora_rank": [12, 10]}, "one kv_lora_rank"),
    ({"rope_freq_indices": [[0, 2, 3, 5]] * 2}, "every c-th"),
    ({"rope_freq_indices": [[0, 2, 4, 6], [0, 1, 2, 3]]}, "the same RoPE frequencies"),
    ({"attention_bias": True}, "attention biases"),
    ({"qk_norm": "head"}, "QK-norm"),
    ({"final_logit_softcapping": 30.0}, "soft caps"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "plain RoPE"),
])
def test_what_the_format_cannot_express_is_named(overrides, words):
    mla = _mla(**overrides)
    with pytest.raises(MLAError, match=words):
        deepseek_v3_tensors(mla.config, mla.state_dict())


# --- mla convert --format deepseek_v3 / mla finetune format=deepseek_v3 on tiny sources ----------------------------

import json  # noqa: E402

from transformers import AutoModelForCausalLM  # noqa: E402

from conftest import convert_tiny, make_tiny  # noqa: E402
from convert.deepseek import load_mla, strides  # noqa: E402
from convert.factorize import NORM_MAX_COND, normalised_latent  # noqa: E402
from convert.ropesplit import strided_pairs  # noqa: E402

# Llama 3 RoPE on head_dim 16 (theta 1e4): wavelengths 6, 20, 63, 199 stay below 1024 / 4, so frequencies 0-3 are
# unchanged; 4 is smoothed and 5-7 are divided by 8.
LLAMA3 = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}}


def _kl(p_logits, q_logits) -> float:
    logp, logq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


@pytest.fixture(scope="module")
def ds_exports(tmp_path_factory):
    """A tiny Llama (plain RoPE) and one with Llama 3 RoPE, each converted at 0.3125 with --format deepseek_v3."""
    root = tmp_path_factory.mktemp("ds")
    out = {}
    for name, extra in (("plain", {}), ("llama3", LLAMA3)):
        make_tiny(root / f"src-{name}", "llama-gqa", **extra)
        convert_tiny(root / f"src-{name}", root / name, kv_budget=0.3125, format="deepseek_v3")
        out[name] = (root / f"src-{name}", root / name)
    return out


@pytest.mark.parametrize("name", ["plain", "llama3"])
def test_deepseek_v3_export_is_stock_and_is_the_verified_model(ds_exports, name):
    from convert.config import ConvertConfig
    from convert.data import load_sources
    from convert.data import calibration_windows
    from convert.sources import load_tokenizer, resolve_source

    src, out = ds_exports[name]
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "deepseek_v3" and raw["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "auto_map" not in raw and not list(out.glob("*.py"))
    assert raw["q_lora_rank"] is None and raw["first_k_dense_replace"] == 2 and raw["num_nextn_predict_layers"] == 0
    assert raw["rope_parameters"]["rope_type"] == "default" and raw["rope_interleave"] is True
    # the budget: round(0.3125 * 2 * 2 KV heads * 16) = 20 cached values per token and layer
    assert raw["kv_lora_rank"] + raw["qk_rope_head_dim"] == 20
    record = json.loads((out / "mla_conversion.json").read_text())
    assert record["format"] == "deepseek_v3"
    stride = record["deepseek_v3"]["rope_stride"]
    kept = [j * stride for j in range(raw["qk_rope_head_dim"] // 2)]
    assert record["ranks"]["rope_freq_indices"] == [kept, kept]
    if name == "llama3":  # only the frequencies Llama 3 scaling leaves unchanged can be kept
        assert set(kept) <= {0, 1, 2, 3}
    # theta' = theta^(c r / d_h): the kept source frequencies exactly
    assert raw["rope_parameters"]["rope_theta"] == pytest.approx(10000.0 ** (stride * raw["qk_rope_head_dim"] / 16))

    ds = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no trust_remote_code
    assert type(ds).__name__ == "DeepseekV3ForCausalLM"
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    # the verification windows of the conversion: the stock model reproduces the recorded KL to the source
    cfg = ConvertConfig(calib="pydoc", calib_seqs=4, calib_len=64, verify_seqs=1)
    _, verify = calibration_windows(load_tokenizer(resolve_source(str(src))), load_sources("pydoc"), cfg)
    with torch.no_grad():
        kl = _kl(ref(verify).logits, ds(verify).logits)
        ours = load_mla(out)(verify).logits
        theirs = ds(verify).logits
    assert kl == pytest.approx(record["verify"]["mean_kl"], rel=1e-3, abs=1e-6)
    assert (ours - theirs).abs().max().item() < TOL  # load_mla reads the stock checkpoint back as the same model
    # decoding on the stock model's cache equals its full forward
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, decoded = ds(ids).logits, _cached_decode(ds, ids, 30)
    assert (decoded - full).abs().max().item() < TOL


def test_a_sharded_export_is_rewritten_whole(tmp_path, monkeypatch):
    """Shards of ~4 KB: the deepseek_v3 rewrite replaces every shard and the index, and the stock model loads it."""
    import convert.save

    monkeypatch.setattr(convert.save.ShardWriter.__init__, "__defaults__", (4096,))
    make_tiny(tmp_path / "src", "llama-gqa")
    convert_tiny(tmp_path / "src", tmp_path / "out", kv_budget=0.3125, format="deepseek_v3")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"


def test_strides_and_strided_pairs():
    assert strides(set(range(8)), 8, 4) == [1, 2]  # 0,1,2,3 and 0,2,4,6
    assert strides(set(range(8)) - {6}, 8, 4) == [1]
    assert strides({0, 1, 2, 3}, 8, 2) == [1, 2, 3]
    assert strides(set(range(8)), 8, 5) == [1]
    scores = torch.tensor([[1.0, 3.0], [5.0, 2.0], [0.0, 1.0], [4.0, 9.0]], dtype=torch.float64)  # (half 4, g 2)
    assert strided_pairs(scores, 2, 2) == [(0, 1), (2, 1)]
    assert strided_pairs(scores, 1, 4) == [(0, 1), (1, 0), (2, 1), (3, 1)]
    with pytest.raises(MLAError):
        strided_pairs(scores, 2, 3)


def _latent_problem(c: torch.Tensor, gen):
    """``down`` with ``c = down x~`` for ``x~ = [c, 1]``, and keys/values ``Z = up c`` exactly (rank r)."""
    m, r = c.shape
    down = torch.cat((torch.eye(r, dtype=torch.float64), torch.zeros(r, 1, dtype=torch.float64)), 1)
    up = torch.randn(10, r, generator=gen, dtype=torch.float64)
    x = torch.cat((c, torch.ones(m, 1, dtype=torch.float64)), 1)
    return down, up, up @ down, x


def test_normalised_latent_is_exact_when_every_token_has_the_same_rms():
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(500, 6, generator=gen, dtype=torch.float64)
    c = 3.0 * c / c.pow(2).mean(1, keepdim=True).sqrt()  # every token's latent has RMS 3
    down, up, z_aug, x = _latent_problem(c, gen)
    metric = torch.eye(10, dtype=torch.float64) + 0.1 * torch.ones(10, 10, dtype=torch.float64)
    t, up_norm, fit = normalised_latent(down, up, z_aug, metric, 4, x)
    assert fit["error"] < 1e-10 and fit["error_plain"] < 1e-20
    u = (x @ down.T @ t.T) / (x @ down.T @ t.T).pow(2).mean(1, keepdim=True).add(1e-6).sqrt()
    assert torch.allclose(u @ up_norm.T, x @ z_aug.T, atol=1e-6)  # the normalised latent gives Z back


def test_normalised_latent_steadies_the_rms_with_a_steady_direction():
    """One latent coordinate is the same for every token, the others vary in size: the transform leans on the steady
    one, so normalising hardly rescales tokens; normalising the raw latent (no transform) loses far more."""
    gen = torch.Generator().manual_seed(1)
    c = torch.randn(800, 6, generator=gen, dtype=torch.float64) * torch.rand(800, 1, generator=gen,
                                                                             dtype=torch.float64).mul(3).add(0.2)
    c[:, 0] = 2.0
    down, up, z_aug, x = _latent_problem(c, gen)
    metric = torch.eye(10, dtype=torch.float64)
    w_k, w_v = torch.rand(800, generator=gen), torch.rand(800, generator=gen)
    _, _, fit = normalised_latent(down, up, z_aug, metric, 4, x, w_k, w_v)
    # the same least-squares fit on the raw latent's normalisation (by hand: no transform)
    z = x @ z_aug.T
    u = c / c.pow(2).mean(1, keepdim=True).sqrt()
    err, base = 0.0, 0.0
    for rows, w in ((slice(0, 4), w_k.double()), (slice(4, 10), w_v.double())):
        b = torch.linalg.lstsq(u * w[:, None].sqrt(), z[:, rows] * w[:, None].sqrt()).solution  # (r, rows)
        err += float((w[:, None] * (u @ b - z[:, rows]) ** 2).sum())
        base += float((w[:, None] * z[:, rows] ** 2).sum())
    assert fit["error"] < 0.1 * err / base
    assert fit["condition"] <= NORM_MAX_COND * (1 + 1e-9)


@pytest.mark.parametrize("name, overrides, words", [
    ("qwen2", {}, "attention biases"),
    ("qwen3", {}, "QK-norm"),
    ("mistral", {}, "sliding-window"),
    ("phi3", {}, "partial rotary"),
    ("gemma3", {}, "QK-norm"),
    ("llama-gqa", {"rope_method": "norm"}, "--rope-method"),
    ("llama-gqa", {"factor_method": "svd"}, "--factor-method"),
    ("llama-gqa", {"kv_lora_rank": 12, "rope_dim": 24}, "--rope-dim between 2 and head_dim 16"),
])
def test_what_the_deepseek_v3_format_cannot_express_is_refused_before_any_work(tiny_models, tmp_path, name,
                                                                               overrides, words):
    with pytest.raises(MLAError, match=words):
        convert_tiny(tiny_models[name], tmp_path / "out", kv_budget=None if overrides.get("kv_lora_rank") else 0.3125,
                     format="deepseek_v3", **overrides)
    assert not (tmp_path / "out").exists()


def test_linear_rope_is_refused(tmp_path):
    make_tiny(tmp_path / "src", "llama-gqa", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 10000.0})
    with pytest.raises(MLAError, match="plain RoPE frequencies"):
        convert_tiny(tmp_path / "src", tmp_path / "out", kv_budget=0.3125, format="deepseek_v3")


def test_finetune_trains_the_latent_norm_and_writes_deepseek_v3(ds_exports, lossless, tmp_path):
    import pydoc_data.topics
    from safetensors.torch import load_file

    from convert.recover import finetune
    from convert.recover.config import RecoverConfig

    topics = list(pydoc_data.topics.topics.values())
    (tmp_path / "train.txt").write_text("\n\n".join(topics[: len(topics) // 2]))
    (tmp_path / "val.txt").write_text("\n\n".join(topics[len(topics) // 2 :]))
    _, conv = ds_exports["plain"]
    cfg = RecoverConfig(data=str(tmp_path / "train.txt"), val_data=str(tmp_path / "val.txt"), seq_len=64,
                        batch_size=2, tokens=64 * 2 * 6, val_tokens=128, eval_every=3, lr=3e-3, warmup_steps=1)
    record = finetune(conv, tmp_path / "rec", cfg, log=lambda *_: None)
    assert record["format"] == "deepseek_v3"
    assert not list((tmp_path / "rec").glob("*.py"))
    before, after = load_file(conv / "model.safetensors"), load_file(tmp_path / "rec" / "model.safetensors")
    assert set(before) == set(after)
    name = "model.layers.0.self_attn.kv_a_layernorm.weight"
    assert not torch.equal(before[name], after[name])  # trained with the norm in place
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "rec", dtype=torch.float32).eval()
    val = record["recovery"]["verify"]
    assert val["val_ppl_reloaded"] == pytest.approx(val["val_ppl_trained"], rel=1e-3)
    ids = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (stock(ids).logits - load_mla(tmp_path / "rec")(ids).logits).abs().max().item() < TOL
    # and the same recovery written in our own format is the same model
    record = finetune(conv, tmp_path / "rec-mla", RecoverConfig(**{**cfg.__dict__, "format": "mla"}),
                      log=lambda *_: None)
    assert record["format"] == "mla"
    own = AutoModelForCausalLM.from_pretrained(tmp_path / "rec-mla", trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        assert (stock(ids).logits - own.eval()(ids).logits).abs().max().item() < TOL
    # an export without the format's constraints cannot be written as deepseek_v3: refused before training
    with pytest.raises(MLAError, match="latent norm"):
        finetune(lossless["llama-gqa"], tmp_path / "no", RecoverConfig(**{**cfg.__dict__, "format": "deepseek_v3"}),
                 log=lambda *_: None)


def test_width_block_rounds_the_budget_down_to_llama_cpp_shapes():
    from convert.allocate import MIN_RANK, block_widths

    # SmolLM2 at 0.3125: 120 values -> 112, RoPE widths 8, 24, 40, 56 (latent 104, 88, 72, 56), head_dim 64
    assert block_widths(120, 64, 16) == (112, [8, 24, 40, 56])
    assert block_widths(120, 32, 16) == (112, [8, 24])  # no RoPE wider than the rotary dims
    assert block_widths(20, 16, 16) == (16, [8])
    assert block_widths(640, 128, 32) == (640, [16, 48, 80, 112])
    assert block_widths(12, 16, 16) is None  # 12 -> 0: no room; the budget's width is kept
    assert block_widths(8 + MIN_RANK - 1 + 16, 16, 16) == (16, [8])
    assert block_widths(120, 64, 0) is None


def test_width_block_16_gives_widths_of_8_mod_16(tiny_models, tmp_path):
    # 20 values -> 16: RoPE 8 (the only odd multiple of 8 up to head_dim 16 leaving MIN_RANK), latent 8
    convert_tiny(tiny_models["llama-gqa"], tmp_path / "out", kv_budget=0.3125, format="deepseek_v3", width_block=16)
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (raw["kv_lora_rank"], raw["qk_rope_head_dim"]) == (8, 8)


def test_a_budget_split_avoids_latent_widths_in_multiples_of_16(tiny_models, tmp_path):
    # MHA tiny at 0.5: 64 values, RoPE 8 or 16 (head_dim 16) -> latent 56 or 48; 48 is a multiple of 16
    convert_tiny(tiny_models["llama-mha"], tmp_path / "out", kv_budget=0.5, format="deepseek_v3")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (raw["kv_lora_rank"], raw["qk_rope_head_dim"]) == (56, 8)
