"""Recovery's device and dtype logic, checked on the CPU (issue 26): every tensor a stage creates follows an explicit
``device`` (or is marked host-side), frozen weights in bfloat16 with the trained ones in float32, and the bad inputs
of a GPU run as one-line errors."""

import inspect
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from conftest import ROOT, convert_tiny, make_tiny, one_error, run_main
from convert.errors import MLAError
from convert.recover import finetune
from convert.recover.config import RecoverConfig

FACTORIES = {torch.tensor, torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.rand, torch.randn,
             torch.randint, torch.randperm, torch.linspace, torch.eye}
PROJECT = (ROOT / "convert", ROOT / "mla_modeling")


class DeviceAudit(TorchFunctionMode):
    """Records every tensor factory called from a file under ``roots`` without a ``device`` argument, unless its
    source line says ``# host`` (host-side bookkeeping: row orders, the readers' CPU tensors). A tensor made that way
    lands on the CPU whatever device the run is on: on CUDA it meets the GPU's tensors and the run crashes."""

    def __init__(self, roots=PROJECT):
        super().__init__()
        self.roots, self.found = tuple(str(r) for r in roots), []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            caller = inspect.currentframe().f_back
            while caller is not None and caller.f_code.co_filename == __file__:
                caller = caller.f_back
            path = caller.f_code.co_filename if caller else ""
            if path.startswith(self.roots):
                line = inspect.getframeinfo(caller).code_context
                if not (line and "# host" in line[0]):
                    self.found.append(f"{path}:{caller.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny GQA Llama converted at budget 0.25, and disjoint training / validation text files."""
    import pydoc_data.topics

    root = tmp_path_factory.mktemp("devices")
    topics = list(pydoc_data.topics.topics.values())
    (root / "train.txt").write_text("\n\n".join(topics[: len(topics) // 2]))
    (root / "val.txt").write_text("\n\n".join(topics[len(topics) // 2:]))
    make_tiny(root / "src", "llama-gqa")
    convert_tiny(root / "src", root / "conv", kv_budget=0.25)
    return root


def _cfg(root: Path, **extra) -> RecoverConfig:
    args = dict(data=str(root / "train.txt"), val_data=str(root / "val.txt"), seq_len=64, batch_size=4,
                tokens=64 * 4 * 4, val_tokens=256, eval_every=2, checkpoint_every=2, lr=3e-3, warmup_steps=1,
                local_tokens=64 * 16, local_epochs=2.0, local_lr=3e-3, device="cpu")
    args.update(extra)
    return RecoverConfig(**args)


def test_the_audit_catches_a_factory_without_device(tmp_path):
    """The audit's own check: a factory call without ``device`` in an audited file is found, one with it or marked
    ``# host`` is not."""
    module = tmp_path / "stage.py"
    module.write_text("import torch\n\ndef make():\n    a = torch.arange(4)\n    b = torch.zeros(2, device='cpu')\n"
                      "    c = torch.ones(3)  # host\n    return a, b, c\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import stage
        audit = DeviceAudit(roots=(tmp_path,))
        with audit:
            stage.make()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("stage", None)
    assert [f.split(" ")[-1] for f in audit.found] == ["arange"]


@pytest.mark.parametrize("local_inputs, extra", [("teacher", {}), ("student", {"teacher_topk": 16, "lora_lr": 1e-3})])
def test_every_recovery_stage_creates_its_tensors_on_the_run_device(setup, tmp_path, local_inputs, extra):
    """The layer-local stage, distillation (with the teacher's top-k cache too), evaluation and export make no tensor
    on an implicit device: the class of bug that crashed the layer-local stage on CUDA (token ids on the GPU indexing
    the CPU embedding table)."""
    audit = DeviceAudit()
    with audit:
        finetune(setup / "conv", tmp_path / "out", _cfg(setup, local_inputs=local_inputs, **extra))
    assert audit.found == []


def test_embedding_rows_are_gathered_where_the_table_is(setup):
    """``LayerwiseModel.embed`` gathers rows on the table's device (the CPU) whatever device the ids are on, and
    returns them on the run's device: ids given on the device no longer index a CPU table with device indices."""
    from convert.adapters import read_layout, text_config
    from convert.layerwise import LayerwiseModel
    from convert.readers import open_reader
    from convert.sources import load_config, resolve_source
    from safetensors.torch import load_file

    source = resolve_source(str(setup / "src"))
    config = load_config(source)
    layout, text = read_layout(config), text_config(config)
    lw = LayerwiseModel(text, open_reader(source, text), "cpu", torch.float32, layout.layer_types, layout.decoder)
    ids = torch.randint(0, 300, (2, 8))
    seen = []

    class Ids(torch.Tensor):  # ids that record the device they are moved to
        def to(self, *args, **kwargs):
            seen.append(args[0] if args else kwargs.get("device"))
            return torch.Tensor.to(self.as_subclass(torch.Tensor), *args, **kwargs)

    table = load_file(setup / "src" / "model.safetensors")["model.embed_tokens.weight"]
    h = lw.embed(ids.as_subclass(Ids))
    assert torch.equal(h.as_subclass(torch.Tensor), table[ids])
    assert [torch.device(d) for d in seen] == [torch.device("cpu")]  # moved to the table's device, nothing else


def test_frozen_weights_bfloat16_trained_float32(setup):
    """With frozen_dtype=bfloat16 every parameter that trains (LoRA, the attention copies, norms) is float32 and
    every other one bfloat16; the weights' bytes are exactly 4 per trained and 2 per frozen element."""
    from convert.deepseek import load_mla
    from convert.recover.models import cast_frozen, cast_untrained, param_bytes, wrap_peft

    cfg = _cfg(setup, precision="bf16", frozen_dtype="bfloat16")
    student = load_mla(setup / "conv")
    cast_frozen(student, cfg, torch.bfloat16)
    assert {p.dtype for n, p in student.named_parameters() if ".self_attn." in n} == {torch.float32}
    assert {p.dtype for n, p in student.named_parameters() if ".mlp." in n} == {torch.bfloat16}
    model = wrap_peft(student, cfg)
    cast_untrained(model, torch.bfloat16)
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert {p.dtype for p in trained} == {torch.float32} and {p.dtype for p in frozen} == {torch.bfloat16}
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert param_bytes(model) == 4 * sum(p.numel() for p in trained) + 2 * sum(p.numel() for p in frozen)


def test_bfloat16_recovery_tracks_the_float32_run(setup, tmp_path):
    """precision=bf16 + frozen_dtype=bfloat16 (the CUDA default) on the CPU: the same layer-local errors (that stage
    trains in float32), a validation curve within 0.02 of the float32 run's, and an export that reproduces it."""
    runs = {}
    for name, extra in {"fp32": {}, "bf16": {"precision": "bf16", "frozen_dtype": "bfloat16"}}.items():
        runs[name] = finetune(setup / "conv", tmp_path / name, _cfg(setup, **extra))["recovery"]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert [e["error_after"] for e in bf16["local"]["layers"]] == pytest.approx(
        [e["error_after"] for e in fp32["local"]["layers"]], rel=1e-4)
    assert [e["ratio"] for e in bf16["val"]] == pytest.approx([e["ratio"] for e in fp32["val"]], abs=0.02)
    v = bf16["verify"]
    assert abs(v["val_ppl_reloaded"] / v["val_ppl_trained"] - 1) < 0.02
    assert bf16["settings"]["frozen_dtype"] == "bfloat16"


@pytest.mark.parametrize("overrides, message", [
    ({"frozen_dtype": "bfloat16", "precision": "fp32"}, "frozen_dtype=bfloat16 needs precision bf16"),
    ({"frozen_dtype": "float16"}, "frozen_dtype must be one of"),
])
def test_bad_dtype_settings(setup, tmp_path, overrides, message):
    with pytest.raises(MLAError, match=message):
        finetune(setup / "conv", tmp_path / "out", _cfg(setup, **overrides))
    assert not (tmp_path / "out").exists()


def test_bfloat16_frozen_weights_on_the_cpu_need_bf16(setup, tmp_path):
    """precision=auto is fp32 on the CPU: frozen bfloat16 weights are refused before any model is loaded."""
    with pytest.raises(MLAError, match="needs bf16 precision"):
        finetune(setup / "conv", tmp_path / "out", _cfg(setup, precision="auto", frozen_dtype="bfloat16"))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_finetune_device_cuda_without_cuda(setup, tmp_path, capsys):
    code, err = run_main(capsys, "finetune", setup / "conv", tmp_path / "out", "device=cuda",
                         f"data={setup / 'train.txt'}", f"val_data={setup / 'val.txt'}", "seq_len=64", "tokens=1024")
    one_error(code, err, "device=cuda", "no CUDA device is available")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists()


def test_a_recipe_for_another_model_is_one_line_error(setup, tmp_path, capsys):
    """recipes/smollm2-135m.yaml names its source: on an export of another shape it stops before anything runs."""
    code, err = run_main(capsys, "finetune", setup / "conv", tmp_path / "out", "--recipe",
                         ROOT / "recipes" / "smollm2-135m.yaml")
    one_error(code, err, "smollm2-135m.yaml is for smollm2-135m", "num_layers 30")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists()


def test_convert_with_a_recipe_for_another_model_is_one_line_error(setup, tmp_path, capsys):
    """mla convert SRC --recipe: the recipe's source is checked against SRC before the conversion runs."""
    code, err = run_main(capsys, "convert", setup / "src", tmp_path / "out", "--recipe",
                         ROOT / "recipes" / "smollm2-135m.yaml")
    one_error(code, err, "smollm2-135m.yaml is for smollm2-135m", "num_layers 30")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists()


def test_convert_recipe_check_compares_shapes_not_names(setup, tmp_path):
    """A recipe written for a model fits another copy of it (same shape, another name), not a model of another shape."""
    import shutil

    from convert.recover.run import check_recipe_source

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source: {setup / 'src'}\nrecover:\n  tokens: 64\n")
    shutil.copytree(setup / "src", tmp_path / "copy")
    check_recipe_source(recipe, str(tmp_path / "copy"))  # the same shape: no error
    make_tiny(tmp_path / "other", "qwen2")
    with pytest.raises(MLAError, match="model_type llama against 'qwen2'"):
        check_recipe_source(recipe, str(tmp_path / "other"))


@pytest.mark.parametrize("world, message", [("1", "an FSDP config on one process"),
                                            ("2", "mla finetune shards by itself")])
def test_fsdp_configs_are_refused(setup, tmp_path, monkeypatch, world, message):
    """What ``accelerate launch --config_file FSDP.yaml`` sets (ACCELERATE_USE_FSDP): one line, nothing written."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(MLAError, match=message):
        finetune(setup / "conv", tmp_path / "out", _cfg(setup))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists()


def test_the_1b_8b_recipe_fits_a_converted_llama(setup, tmp_path):
    """recipes/gpu-1b-8b.yaml (no source: any model) names modules a converted Llama has: two steps run, and the
    record holds the memory estimate whose static terms are the wrapped student's own bytes."""
    from convert.config import load_recipe

    values = load_recipe(ROOT / "recipes" / "gpu-1b-8b.yaml", "recover", RecoverConfig)
    values.update(data=str(setup / "train.txt"), val_data=str(setup / "val.txt"), seq_len=64, tokens=1024,
                  val_tokens=256, local_tokens=256, device="cpu")
    rec = finetune(setup / "conv", tmp_path / "out", RecoverConfig(**values),
                   recipe=ROOT / "recipes" / "gpu-1b-8b.yaml")["recovery"]
    # each term from the two checkpoints' tensors and the recipe (float32 on the CPU): LoRA r=32 on q, o, gate, up,
    # down; the latent projections and the norms trained whole (peft keeps a frozen original of each)
    conv, src = load_file(setup / "conv" / "model.safetensors"), load_file(setup / "src" / "model.safetensors")
    lora = sum(32 * sum(t.shape) for k, t in conv.items()
               if k.endswith(("q_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight",
                              "down_proj.weight")))
    full = sum(t.numel() for k, t in conv.items()
               if k.endswith(("kv_a_proj_with_mqa.weight", "kv_b_proj.weight", "layernorm.weight", "model.norm.weight")))
    teacher_own = sum(t.numel() for k, t in src.items() if k.endswith(("k_proj.weight", "v_proj.weight"))
                      or k.endswith("q_proj.weight") and not torch.equal(t, conv[k]))  # q kept as is: shared
    tokens = 2 * 64  # micro_batch x seq_len; gradient checkpointing: every layer's input, one layer's working set
    activations = 6 * tokens * 320 * 4 + tokens * 64 * 4 * 2 + tokens * (8 * 64 + 4 * 128 + 4 * 64) * 4
    want = {"weights": 4 * (sum(t.numel() for t in conv.values()) + lora + full), "gradients": 4 * (lora + full),
            "optimizer": 8 * (lora + full), "teacher": 4 * teacher_own, "activations": activations}
    assert rec["trainable_parameters"] == lora + full
    assert rec["memory"]["estimate"] == want | {"total": sum(want.values())}
    assert rec["memory"]["measured"]["peak_rss_bytes"] > want["weights"]  # the weights are resident while training
    local = rec["local"]["memory"]  # the layer-local stage's: the whole student, 3 float32 (N, T, d) tensors, ...
    weights = sum(t.numel() * 4 for t in conv.values())  # float32 on the CPU
    layer = sum(conv[f"model.layers.0.self_attn.{k}.weight"].numel() for k in ("kv_a_proj_with_mqa", "kv_b_proj"))
    want = {"weights": weights, "hidden_states": 3 * 4 * 64 * 64 * 4,  # teacher inputs: x, next x, target
            "original_layers": 2 * 4 * (64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128 + 2 * 64),  # this and the next layer
            # one attention layer's latent projections with gradients and Adam's moments; the working set of
            # local_batch (2) windows through one attention layer, its (heads, T, T) scores included
            "training": 16 * layer + 2 * 64 * (8 * 64 + 4 * 64) * 4 + 2 * 4 * 64 * 64 * 4}
    assert rec["local"]["windows"] == 256 // 64 and local["estimate"] == want | {"total": sum(want.values())}
    assert local["measured"]["peak_rss_bytes"] > weights


def test_memory_tool_on_a_real_shape():
    """tools/recover_memory.py on the 8B shape with the 1B-8B recipe: the bf16 frozen weights hold the estimate
    under the 40 GiB target, and float32 frozen weights cost 2 bytes more per frozen element."""
    import subprocess

    def run(*extra):
        out = subprocess.run([sys.executable, "tools/recover_memory.py", "llama-3.1-8b", "--recipe",
                              "recipes/gpu-1b-8b.yaml", *extra], capture_output=True, text=True, cwd=ROOT, check=True)
        lines = out.stdout.strip().splitlines()
        return float(lines[-1].split(": ")[1].split(" GiB")[0]), lines

    bf16, lines = run()
    fp32, _ = run("frozen_dtype=float32")
    assert bf16 <= 40, lines[-1]
    local = lines[0]  # the layer-local stage: 256 windows of 1024, hidden 4096, 3 float32 copies
    assert local.startswith("layer-local stage, 256 windows of 1024") and "hidden_states 12.0 GiB" in local, local
    assert float(local.split(": ")[1].split(" GiB")[0]) <= 40, local
    assert fp32 > bf16 + 10  # an 8B model's ~7.7B frozen elements at 2 more bytes each, plus the teacher's
