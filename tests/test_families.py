"""Families (issue 14): Qwen3, Gemma 3 (text and multimodal checkpoints), Gemma 2, Phi-3, OLMo 2, Granite, SmolLM3.

Every family's tiny random model (conftest.TINY: QK-norm, sliding windows, soft caps, partial rotary, NoPE layers,
multipliers, random norm gains) converts exactly at budget 1 (test_convert.test_budget_one_is_lossless covers all
of TINY); here: cached decoding, absorbed decoding, generate, the save/load round trip and each family's own
settings in the export, at budget 1 and at 0.3125.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY, VOCAB, _tokenizer, assembled_reference_error, calibrate_tiny, convert_tiny
from convert.config import ConvertConfig

TOL = 1e-4  # fp32 logits
NEW = ["qwen3", "gemma3", "gemma2", "phi3", "olmo2", "granite", "smollm3"]


def _load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32, **kw).eval()


def _ids(batch=2, length=24, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def lowrank(tiny_models, tmp_path_factory):
    """The new families (and llama-gqa) converted at the default budget (0.3125, Fisher ranks and RoPE per layer)."""
    root = tmp_path_factory.mktemp("lowrank")
    for name in NEW + ["llama-gqa"]:
        convert_tiny(tiny_models[name], root / name)
    return {name: root / name for name in NEW + ["llama-gqa"]}


@pytest.mark.parametrize("name", NEW)
def test_cached_decode_equals_full_forward(name, lossless, lowrank):
    """Prefill 10 tokens, then decode one token at a time on the latent cache (absorbed attention) past the sliding
    window (8): the same logits as one full forward, lossless and low-rank."""
    for path in (lossless[name], lowrank[name]):
        mla = _load(path)
        ids = _ids()
        with torch.no_grad():
            full = mla(ids, use_cache=False).logits
            out = mla(ids[:, :10], use_cache=True)
            steps, cache = [out.logits], out.past_key_values
            for t in range(10, ids.shape[1]):
                out = mla(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits)
        assert (torch.cat(steps, 1) - full).abs().max().item() < TOL


@pytest.mark.parametrize("name", NEW + ["llama-gqa"])
def test_absorbed_equals_decompressed(name, lowrank):
    mla = _load(lowrank[name])
    ids = _ids(length=12)
    with torch.no_grad():
        mla.config.absorb = "never"
        a = mla(ids).logits
        mla.config.absorb = "always"
        b = mla(ids).logits
    assert (a - b).abs().max().item() < TOL


@pytest.mark.parametrize("name", NEW)
def test_generate_equals_the_source(name, tiny_models, lossless):
    src = AutoModelForCausalLM.from_pretrained(tiny_models[name], dtype=torch.float32).eval()
    mla = _load(lossless[name])
    ids = _ids(length=6)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ref, got = src.generate(ids, **kw), mla.generate(ids, **kw)
    assert len(got.logits) == 12 and (torch.stack(got.logits) - torch.stack(ref.logits)).abs().max().item() < TOL
    assert torch.equal(ref.sequences, got.sequences)


@pytest.mark.parametrize("name", NEW)
def test_save_pretrained_round_trip(name, lowrank, tmp_path):
    mla = _load(lowrank[name])
    mla.save_pretrained(tmp_path / "again")
    again = _load(tmp_path / "again")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(mla(ids).logits, again(ids).logits)


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_family_settings_reach_the_export(lossless):
    """What each family needs, in the export's config (budget 1: every RoPE pair the layer has is kept)."""
    qwen3 = _config(lossless["qwen3"])
    assert qwen3["qk_norm"] == "head" and qwen3["norm_layout"] == "pre"
    gemma3 = _config(lossless["gemma3"])
    assert gemma3["qk_norm"] == "head" and gemma3["norm_layout"] == "sandwich" and gemma3["rms_norm_unit_offset"]
    assert gemma3["embedding_multiplier"] == 8.0 and gemma3["final_logit_softcapping"] == 30.0
    assert gemma3["layer_types"] == ["sliding_attention", "full_attention"] and gemma3["sliding_window"] == 8
    assert gemma3["rope_parameters"]["full_attention"]["rope_type"] == "linear"
    assert gemma3["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    gemma2 = _config(lossless["gemma2"])
    assert gemma2["attn_logit_softcapping"] == 5.0 and gemma2["final_logit_softcapping"] == 3.0
    assert gemma2["layer_types"] == ["sliding_attention", "full_attention"]
    olmo2 = _config(lossless["olmo2"])
    assert olmo2["qk_norm"] == "projection" and olmo2["norm_layout"] == "post" and olmo2["rms_norm_float_weight"]
    granite = _config(lossless["granite"])
    assert (granite["embedding_multiplier"], granite["residual_multiplier"], granite["logits_scaling"]) == \
        (12.0, 0.22, 8.0)
    # Phi-3 rotates 8 of 16 dims per head: 2 KV heads keep 16 RoPE values, the other 48 of 64 are the latent
    phi3 = _config(lossless["phi3"])
    assert (phi3["qk_rope_head_dim"], phi3["kv_lora_rank"]) == (16, 48)
    assert all(len(idx) == 8 and max(idx) < 4 for idx in phi3["rope_freq_indices"])
    # SmolLM3's layer 1 has no RoPE: its whole budget is the latent
    smollm3 = _config(lossless["smollm3"])
    assert smollm3["qk_rope_head_dim"] == [32, 0] and smollm3["kv_lora_rank"] == [32, 64]


def test_nope_layer_gives_its_rope_share_to_the_latent(tiny_models, tmp_path):
    convert_tiny(tiny_models["smollm3"], tmp_path / "m", kv_budget=0.5, rank_alloc="uniform", rope_share=0.25)
    cfg = _config(tmp_path / "m")
    assert cfg["qk_rope_head_dim"] == [8, 0] and cfg["kv_lora_rank"] == [24, 32]  # 32 values per layer either way


@pytest.fixture(scope="module")
def qk_norm_calibrated(tiny_models, tmp_path_factory):
    """(reader, layout, stats with gradients) of each tiny QK-norm family, calibrated once."""
    return {name: calibrate_tiny(tiny_models[name], tmp_path_factory.mktemp(name))[:3] for name in ("qwen3", "olmo2")}


@pytest.mark.parametrize("factor", ["fisher", "pca"])
@pytest.mark.parametrize("name", ["qwen3", "olmo2"])
def test_qk_norm_latent_is_the_reference_factorization(name, factor, qk_norm_calibrated):
    """The latent of normalized keys (the problem on ``y = [k_norm(k); v]``): at ranks 8, 24 and 40 (RoPE 8) each
    head's key and value maps in the assembled layers are those of ``conftest.reference_factorization`` (whitened
    SVD, least-squares refit) of that problem. Budget 1 is lossless: test_convert.test_budget_one_is_lossless."""
    reader, layout, stats = qk_norm_calibrated[name]
    assert layout.qk_norm
    for rank in (8, 24, 40):
        cfg = ConvertConfig(kv_lora_rank=rank, rope_dim=8, factor_method=factor)
        assert assembled_reference_error(reader, layout, stats, cfg) < 1e-5, rank


def test_svd_factorization_is_refused_for_qk_norm(tiny_models, tmp_path):
    from convert.errors import MLAError

    with pytest.raises(MLAError, match="svd.*key norm"):
        convert_tiny(tiny_models["qwen3"], tmp_path / "m", kv_budget=0.5, factor_method="svd")


def _gemma3_multimodal(folder):
    """A tiny Gemma 3 image-text checkpoint (SigLIP tower + projector + the tiny gemma3 text model)."""
    from transformers import AutoConfig, Gemma3Config, Gemma3ForConditionalGeneration

    _, heads, kv_heads, extra = TINY["gemma3"]
    text = AutoConfig.for_model(
        "gemma3_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **{k: v for k, v in extra.items() if v is not None})
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2, image_token_index=VOCAB - 1)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and name.endswith("norm.weight"):
                p.normal_(0, 0.3)
            if "language_model" in name and ("q_proj" in name or "k_proj" in name):
                p.mul_(8.0)
    model.save_pretrained(folder)
    _tokenizer(folder)
    return model


def test_gemma3_multimodal_checkpoint_exports_its_text_model(tmp_path):
    src = tmp_path / "gemma3-mm"
    model = _gemma3_multimodal(src)
    record = convert_tiny(src, tmp_path / "m", kv_budget=1.0)
    assert record["source"]["model_type"] == "gemma3_text"
    mla = _load(tmp_path / "m")
    names = {n for n, _ in mla.named_parameters()}
    assert not any("vision" in n or "multi_modal" in n for n in names)
    ids = _ids(length=16)
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, mla(ids).logits
    assert (ref - got).abs().max().item() < TOL


ROPE_VARIANTS = {  # dynamic RoPE types on a TINY model: the export reproduces the switch past the trained length (64)
    "phi3-longrope": ("phi3", {"rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.5, 2.5, 4.0, 6.0],
        "original_max_position_embeddings": 64}, "original_max_position_embeddings": 64, "rope_theta": None}),
    "qwen3-yarn": ("qwen3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                 "original_max_position_embeddings": 64}, "rope_theta": None}),
    "llama-dynamic": ("llama-gqa", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
                                "max_position_embeddings": 64, "rope_theta": None}),
}


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_dynamic_rope_types_are_lossless_past_the_trained_length(variant, tmp_path, monkeypatch):
    import conftest

    tiny, extra = ROPE_VARIANTS[variant]
    model_type, heads, kv_heads, family = TINY[tiny]
    monkeypatch.setitem(conftest.TINY, variant, (model_type, heads, kv_heads, {**family, **extra}))
    src = tmp_path / "src"
    conftest.make_tiny(src, variant)
    convert_tiny(src, tmp_path / "m", kv_budget=1.0, calib_len=48)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    mla = _load(tmp_path / "m")
    for length in (40, 100):  # inside and past the pretraining length
        ids = _ids(length=length)
        with torch.no_grad():
            assert (ref(ids).logits - mla(ids).logits).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["qwen3", "olmo2", "gemma3", "phi3"])
def test_finetune_trains_each_familys_attention(name, lowrank, tmp_path):
    """Recovery on a family's export: the default full_targets train what the family has (QK-norm: k_a_proj and
    the norms; OLMo 2 has no input_layernorm), the teacher is the source, and the merged export is what was trained."""
    import pydoc_data.topics
    from safetensors.torch import load_file

    from convert.recover import finetune
    from convert.recover.config import RecoverConfig

    (tmp_path / "train.txt").write_text("\n\n".join(list(pydoc_data.topics.topics.values())[:60]))
    cfg = RecoverConfig(data=str(tmp_path / "train.txt"), val_data="", seq_len=32, batch_size=2, tokens=32 * 2 * 4,
                        checkpoint_every=2, lr=1e-2, warmup_steps=1)
    record = finetune(lowrank[name], tmp_path / "ft", cfg, log=lambda *_: None)
    assert record["recovery"]["steps"] == 4
    before, after = load_file(lowrank[name] / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    assert set(before) == set(after)
    changed = {k.split(".", 3)[-1] for k in before
               if k.startswith("model.layers.0.") and not torch.equal(before[k], after[k])}
    want = {"self_attn.q_proj.weight", "self_attn.kv_b_proj.weight", "mlp.down_proj.weight"}
    if name in ("qwen3", "olmo2", "gemma3"):
        want |= {"self_attn.k_a_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight"}
    assert want <= changed, changed
    # the export computes what the trained weights compute in the converted model's own config (read apart)
    trained = _load(lowrank[name])
    missing, unexpected = trained.load_state_dict(after, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    with torch.no_grad():
        got, before_logits, want = _load(tmp_path / "ft")(_ids()).logits, _load(lowrank[name])(_ids()).logits, \
            trained(_ids()).logits
    assert (got - want).abs().max().item() < TOL and (got - before_logits).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("name", ["qwen3", "gemma2", "gemma3", "olmo2", "granite", "phi3", "smollm3", "mistral"])
def test_layer_local_stage_matches_each_familys_attention(name, lossless, lowrank, tiny_models, tmp_path):
    """The layer-local stage pairs the original's attention output (a hook on the family's own ``self_attn``, its
    masks, soft caps, norms and multipliers) with ours: on a lossless export the error before training is 0; on a
    low-rank one training lowers it in every layer."""
    from dataclasses import replace

    import pydoc_data.topics

    from safetensors.torch import load_file

    from convert.recover import finetune
    from convert.recover.config import RecoverConfig

    (tmp_path / "train.txt").write_text("\n\n".join(list(pydoc_data.topics.topics.values())[:60]))
    cfg = RecoverConfig(data=str(tmp_path / "train.txt"), val_data="", seq_len=32, batch_size=2, tokens=32 * 2,
                        lr=1e-30, warmup_steps=0, local_tokens=32 * 16, local_epochs=8.0, local_lr=1e-4)
    exact = finetune(lossless[name], tmp_path / "exact", cfg, log=lambda *_: None)["recovery"]["local"]["layers"]
    assert all(e["error_before"] < 1e-9 and not e["trained"] for e in exact), exact  # exact: left as it was
    if name in lowrank:
        cfg = replace(cfg, local_inputs="student")  # the student's own stream, through its trained layers
        low = finetune(lowrank[name], tmp_path / "low", cfg, log=lambda *_: None)["recovery"]["local"]["layers"]
        old, new = (load_file(folder / "model.safetensors") for folder in (lowrank[name], tmp_path / "low"))
        for e in low:  # a layer's attention changed exactly where the stage kept its training (lr 1e-30 after it)
            part = f".layers.{e['layer']}.self_attn."
            moved = [k for k in old.keys() & new.keys() if part in k and not torch.equal(old[k], new[k])]
            assert bool(moved) == e["trained"], (e, moved)
        assert sum(e["error_after"] for e in low) < sum(e["error_before"] for e in low), low


def test_source_cache_implementation_is_not_carried_over(tiny_models, tmp_path):
    """Gemma 3 ships ``cache_implementation: hybrid``; the export's latent cache is a DynamicCache."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_models["gemma3"], src)
    gen = json.loads((src / "generation_config.json").read_text())
    (src / "generation_config.json").write_text(json.dumps({**gen, "cache_implementation": "hybrid"}))
    convert_tiny(src, tmp_path / "m", kv_budget=0.5)
    assert "cache_implementation" not in json.loads((tmp_path / "m" / "generation_config.json").read_text())
    mla = _load(tmp_path / "m")
    out = mla.generate(_ids(length=6), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert type(out.past_key_values).__name__ == "DynamicCache"
