"""Scale (issue 13): layer-sequential conversion equals the whole-model maths; shards, spills, dtypes, devices."""

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import convert_tiny, make_tiny
from convert.adapters import read_layout
from convert.calibrate import sweep
from convert.cli import main
from convert.data import load_texts, token_windows
from convert.layerwise import LayerwiseModel, Spill
from convert.readers import SafetensorsReader
from conftest import FAST, assert_error

pytestmark = pytest.mark.usefixtures("_no_progress_output")  # conftest: no progress bars in stderr


def _state(folder) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _as_tokens(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(B, T, ...) or, for a norm applied after the head transpose (Gemma 3), (B, H, T, d_h) -> (B*T, width)."""
    if transposed:
        t = t.transpose(1, 2)
    return t.reshape(t.shape[0] * t.shape[1], -1)


def _reference_stats(src, windows):
    """Per layer, from one whole-model forward + backward (plain autograd, no layer-by-layer code): E[y y^T] of
    y = [k; v] (k the keys as cached: after the key norm of QK-norm families), E[u u^T] and E[|g|^2 y y^T] of the
    key/value output gradients of the summed next-token loss."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model.requires_grad_(False)
    transposed = model.config.model_type == "gemma3_text"
    outs = {}
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        if hasattr(attn, "qkv_proj"):  # Phi-3: k and v are column blocks of one output
            nq, nk = attn.config.num_attention_heads * attn.head_dim, attn.config.num_key_value_heads * attn.head_dim

            def fused(module, args, output, i=i, nq=nq, nk=nk):
                output.retain_grad()
                outs[i] = (output, {"k": slice(nq, nq + nk), "v": slice(nq + nk, nq + 2 * nk)})
            attn.qkv_proj.register_forward_hook(fused)
            continue
        for name, module in (("k", getattr(attn, "k_norm", attn.k_proj)), ("v", attn.v_proj)):
            def hook(module, args, output, key=(i, name)):
                output.retain_grad()
                outs[key] = output
            module.register_forward_hook(hook)

    def tap(i, name, grad=False):
        if i in outs:
            out, cols = outs[i]
            return _as_tokens(out.grad if grad else out.detach(), False)[:, cols[name]]
        out = outs[(i, name)]
        return _as_tokens(out.grad if grad else out.detach(), transposed and name == "k" and out.dim() == 4)

    emb = model.get_input_embeddings()(windows).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, use_cache=False).logits[:, :-1]
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                                      reduction="sum").backward()
    ref = []
    for i in range(len(model.model.layers)):
        y = torch.cat([tap(i, n) for n in "kv"], 1).double()
        row = {"cov": y.T @ y / len(y)}
        for n in "kv":
            g = tap(i, n, grad=True).double()
            n2 = (g**2).sum(1)
            u = g / n2.clamp_min(1e-30).sqrt()[:, None]  # a token with no gradient (the last) has no direction
            row[f"grad_{n}"], row[f"cov_{n}"] = u.T @ u / len(y), (y * n2[:, None]).T @ y / len(y)
        ref.append(row)
    return ref


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2", "mistral", "qwen3", "gemma3", "gemma2", "phi3", "olmo2",
                                  "granite", "smollm3"])
def test_reverse_sweep_gives_the_whole_model_gradients(tiny_models, tmp_path, name):
    """Layer by layer forward, then a reverse sweep recomputing each layer: the same statistics as one autograd pass."""
    src = tiny_models[name]
    config = AutoConfig.from_pretrained(src)
    layout = read_layout(config)
    windows = token_windows(AutoTokenizer.from_pretrained(src), load_texts("pydoc"), 48, 4, seed=1)
    lw = LayerwiseModel(config, SafetensorsReader(src), "cpu", torch.float32, layout.layer_types, layout.decoder)
    stats = [None] * layout.num_layers
    order = []
    sweep(lw, layout, windows, 2, True, lambda i, s: (order.append(i), stats.__setitem__(i, s)), Spill(tmp_path, 0))
    assert order == list(reversed(range(layout.num_layers)))  # each layer handed on as soon as it is complete
    assert not list(tmp_path.iterdir())  # spilled boundary states are removed once used
    for got, want in zip(stats, _reference_stats(src, windows)):
        for key, ref in want.items():
            value = getattr(got, key)
            assert torch.allclose(value, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max())), key


@pytest.mark.parametrize("settings", [{}, {"rank_alloc": "uniform"}, {"kv_budget": 1.0}])
def test_streamed_export_equals_in_memory_export(tmp_path, settings):
    """A safetensors folder is read tensor by tensor; a pytorch_model.bin folder is loaded whole by transformers:
    both go through the same per-layer code and give the same export (<= 1e-6)."""
    make_tiny(tmp_path / "st", "llama-gqa", seed=3)
    model = make_tiny(tmp_path / "bin", "llama-gqa", seed=3)
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert not list((tmp_path / "bin").glob("*.safetensors"))
    a = convert_tiny(tmp_path / "st", tmp_path / "out-st", **settings)
    b = convert_tiny(tmp_path / "bin", tmp_path / "out-bin", **settings)
    assert a["ranks"] == b["ranks"]
    assert _max_diff(_state(tmp_path / "out-st"), _state(tmp_path / "out-bin")) <= 1e-6


def test_shards_and_spills_change_nothing(tiny_models, tmp_path, monkeypatch):
    """Tiny shards (one tensor each) and everything spilled to disk give the same export as one file in memory."""
    import convert.save
    import convert.pipeline

    src = tiny_models["llama-gqa"]
    convert_tiny(src, tmp_path / "one")
    monkeypatch.setattr(convert.pipeline, "SPILL_BYTES", 0)
    monkeypatch.setattr(convert.save.ShardWriter.__init__, "__defaults__", (1,))
    convert_tiny(src, tmp_path / "many")
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(files) == len(index["weight_map"]) > 10
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors" and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _state(tmp_path / "one").values())
    assert not (tmp_path / "many" / ".work").exists()
    assert _max_diff(_state(tmp_path / "one"), _state(tmp_path / "many")) == 0.0
    m1 = AutoModelForCausalLM.from_pretrained(tmp_path / "one", trust_remote_code=True)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "many", trust_remote_code=True)
    ids = torch.arange(3, 40)[None]
    assert torch.equal(m1(ids).logits, m2(ids).logits)


def test_export_dtype_follows_the_source(tmp_path):
    """A bf16 source gives a bf16 export (loads in bf16, finite logits); --dtype overrides."""
    model = make_tiny(tmp_path / "src", "llama-gqa")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "src")
    assert AutoConfig.from_pretrained(tmp_path / "src").dtype == torch.bfloat16
    rec = convert_tiny(tmp_path / "src", tmp_path / "auto")
    assert rec["method"]["dtype"] == "bfloat16" and rec["kv_cache"]["dtype_bytes"] == 2
    assert {t.dtype for t in _state(tmp_path / "auto").values()} == {torch.bfloat16}
    convert_tiny(tmp_path / "src", tmp_path / "f32", dtype="float32")
    f32 = _state(tmp_path / "f32")
    assert {t.dtype for t in f32.values()} == {torch.float32}
    # the same conversion, stored in bf16: the float32 export's weights rounded to bf16, and logits within two bf16
    # epsilons of the logits' scale
    auto = _state(tmp_path / "auto")
    assert auto.keys() == f32.keys() and all(torch.equal(auto[k], f32[k].to(torch.bfloat16)) for k in auto)
    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "auto", trust_remote_code=True,
                                                   dtype=torch.bfloat16)(ids).logits.float()
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "f32", trust_remote_code=True,
                                                    dtype=torch.float32)(ids).logits
    assert (got - want).abs().max().item() < 2 * torch.finfo(torch.bfloat16).eps * want.abs().max().item()


def _vm_hwm() -> int:
    """This process's peak RSS as the kernel keeps it for its address space (VmHWM), in bytes."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_profile_is_recorded(tiny_models, tmp_path):
    before = _vm_hwm()
    convert_tiny(tiny_models["llama-gqa"], tmp_path / "out")
    after = _vm_hwm()
    saved = json.loads((tmp_path / "out" / "mla_conversion.json").read_text())
    prof = saved["profile"]
    assert prof["device"] == "cpu" and prof["compute_dtype"] == "float32"
    assert set(prof["stage_s"]) == {"load", "calibrate", "convert", "verify"}
    assert sum(prof["stage_s"].values()) <= saved["elapsed_s"] + 0.1
    assert before <= prof["peak_rss_bytes"] <= after  # the conversion ran in this process
    assert prof["export_bytes"] == sum(p.stat().st_size for p in (tmp_path / "out").iterdir()
                                       if p.name != "mla_conversion.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(capsys, tiny_models, tmp_path):
    code, err = _run(capsys, tiny_models["llama-gqa"], tmp_path / "out", "--device", "cuda")
    assert_error(code, err, tmp_path / "out", "no CUDA device is available")


def test_full_disk_while_writing_shards(capsys, tiny_models, tmp_path, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, err = _run(capsys, tiny_models["llama-gqa"], tmp_path / "out")
    assert_error(code, err, tmp_path / "out", "no space left on the device")


def test_bad_device_value(capsys, tiny_models, tmp_path):
    code, err = _run(capsys, tiny_models["llama-gqa"], tmp_path / "out", "--device", "tpu")
    assert_error(code, err, tmp_path / "out", "--device must be auto, cpu or cuda")


def _run(capsys, src, out, *flags):
    code = main(["convert", str(src), str(out), *FAST, *flags])
    return code, capsys.readouterr().err


def test_the_smollm2_shape_is_the_real_models_config():
    """The smollm2-135m shape (random weights for GPU timing of its recipes) has every shape field of the real model's
    config, read from its GGUF, and passes the recipe's check that the source has the recipe's shape."""
    from convert.recover.models import source_shape
    from convert.sources import load_config, resolve_source
    from eval.bench_convert import SHAPES, shape_config

    real = load_config(resolve_source("smollm2-135m"))
    config = shape_config("smollm2-135m")
    assert source_shape(config) == source_shape(real)
    for key in ("intermediate_size", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(config, key) == getattr(real, key), key
    assert config.rope_parameters["rope_theta"] == real.rope_parameters["rope_theta"]
    assert config.rms_norm_eps == pytest.approx(real.rms_norm_eps)
    assert SHAPES["smollm2-135m"]["vocab_size"] == real.vocab_size


def test_bench_convert_tiny_shape(tiny_models, tmp_path, monkeypatch):
    """The benchmark writes a random bf16 checkpoint of the shape (once), converts it in a child and reports the
    child's own peak: not this process's, which is made larger than any tiny conversion needs first."""
    from eval.bench_convert import SHAPES, bench_convert

    ballast = bytearray(1536 * 2**20)  # 1.5 GiB, touched page by page: this process's peak grows by that much
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    parent_peak = _vm_hwm()
    del ballast
    monkeypatch.setenv("MLA_RETROFIT_CACHE", str(tmp_path / "cache"))
    result = bench_convert("tiny-llama", ["--kv-budget", "0.25", *FAST], out=str(tmp_path / "out"),
                           tokenizer=str(tiny_models["llama-gqa"]), load_check=True,
                           json_path=str(tmp_path / "r.json"), log=lambda *_: None)
    src = tmp_path / "cache" / "shapes" / "tiny-llama"
    config = json.loads((src / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert config[key] == SHAPES["tiny-llama"][key]
    assert config["dtype"] == "bfloat16" and {t.dtype for t in _state(src).values()} == {torch.bfloat16}
    assert result == json.loads((tmp_path / "r.json").read_text())
    assert result["export_dtype"] == "bfloat16" and result["kv_cache_ratio"] == 0.25
    assert result["load_check"]["finite"] and result["load_check"]["cache_ratio"] == 0.25
    assert result["source_bytes"] == sum(p.stat().st_size for p in src.iterdir())
    # the child imports torch and transformers (far more than 100 MiB resident) and converts a tiny model (far less
    # than the 1.5 GiB ballast); a figure that started from this process's peak would be above parent_peak
    assert 100 * 2**20 < result["peak_rss_bytes"] < min(parent_peak, 1536 * 2**20)
    assert result["load_check"]["peak_rss_bytes"] < min(parent_peak, 1536 * 2**20)


def test_real_shapes_are_the_published_ones():
    """Golden numbers from each model's published config.json."""
    from eval.bench_convert import shape_config

    c = shape_config("llama-3.1-8b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.vocab_size, c.tie_word_embeddings) == (4096, 14336, 32, 32, 8, 128, 128256, False)
    c = shape_config("llama-3.2-1b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.vocab_size, c.tie_word_embeddings) == (2048, 8192, 16, 32, 8, 64, 128256, True)
    c = shape_config("qwen2.5-7b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size) == (3584, 18944, 28, 28, 4, 152064)


def test_teacher_shares_frozen_weights_with_the_student(tiny_models, tmp_path):
    """mla finetune's teacher reuses the student's frozen tensors (embeddings, MLP base weights) and still computes
    exactly the original model's logits."""
    from convert.recover.config import RecoverConfig
    from convert.recover.models import load_student, load_teacher, wrap_peft
    from convert.sources import load_config, load_model, resolve_source

    src = tiny_models["qwen2"]  # untied head: embeddings and lm_head both shared
    convert_tiny(src, tmp_path / "conv")
    student = wrap_peft(load_student(tmp_path / "conv"), RecoverConfig())
    source = resolve_source(str(src))
    teacher, shared = load_teacher(source, load_config(source), student, torch.device("cpu"))
    reference, _ = load_model(source)
    ids = torch.arange(3, 60)[None]
    with torch.no_grad():
        assert torch.equal(teacher(ids).logits, reference(ids).logits)
    frozen = {p.data_ptr() for p in student.parameters() if not p.requires_grad}
    trained = {p.data_ptr() for p in student.parameters() if p.requires_grad}
    t = dict(teacher.named_parameters())
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight"):
        assert t[name].data_ptr() in frozen, name  # norms: the frozen originals peft keeps beside the trained copy
    assert not {p.data_ptr() for p in t.values()} & trained
    assert t["model.layers.0.self_attn.k_proj.weight"].data_ptr() not in frozen  # the original attention is its own
    # everything outside attention is shared (so is an attention tensor the conversion left exactly as it was, e.g.
    # o_proj, or q_proj of a layer given no RoPE): the reported figure is what the teacher really reuses
    assert shared == sum(p.numel() * 4 for p in t.values() if p.data_ptr() in frozen)
    assert shared >= sum(p.numel() * 4 for n, p in t.items() if ".self_attn." not in n)
    assert not any(p.requires_grad for p in teacher.parameters())
