"""The export loads in a fresh virtualenv that has only torch + transformers (not this project)."""

import subprocess
import textwrap

import pytest
import torch
import transformers

from conftest import convert_tiny, fake_bigbench_sdist, fresh_venv, multiple_choice_accuracy

SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys, torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    assert importlib.util.find_spec("convert") is None and importlib.util.find_spec("mla_modeling") is None
    for path in sys.argv[1:]:
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        base = AutoModel.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
        ids = torch.tensor([[5, 17, 33, 101, 7, 250, 9, 12, 44, 3, 18, 200]])
        with torch.no_grad():
            logits = model(ids).logits
            out = model.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            cache = model(ids, use_cache=True).past_key_values
        print(json.dumps({"type": config.model_type, "base": type(base).__name__, "logits": logits[0, -1, :8].tolist(),
                          "generated": out.sequences[0].tolist(), "steps": [l[0].tolist() for l in out.logits],
                          "cache_last_dims": [cache.layers[0].keys.shape[-1], cache.layers[0].values.shape[-1]]}))
    """
)
# One export per family (budget 0.5): each must load and run with nothing of this project around.
VENV_FAMILIES = ["qwen2", "qwen3", "gemma3", "gemma2", "phi3", "olmo2", "granite", "smollm3"]


def _exports(tiny_models, tmp_path, names=("qwen2",)) -> list:
    """Tiny exports at budget 0.5 of ``names``."""
    outs = []
    for name in names:
        outs.append(tmp_path / f"export-{name}")
        convert_tiny(tiny_models[name], outs[-1], kv_budget=0.5)
    return outs


@pytest.mark.slow
@pytest.mark.network
def test_export_loads_in_fresh_venv_with_only_torch_and_transformers(tiny_models, tmp_path):
    outs, py = _exports(tiny_models, tmp_path, VENV_FAMILIES), fresh_venv(transformers.__version__)
    run = subprocess.run([py, "-c", SCRIPT, *map(str, outs)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    from transformers import AutoModelForCausalLM

    lines = run.stdout.strip().splitlines()[-len(outs):]
    for out, line in zip(outs, lines):
        got = json.loads(line)
        here = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
        ids = torch.tensor([[5, 17, 33, 101, 7, 250, 9, 12, 44, 3, 18, 200]])
        generated = torch.tensor([got["generated"]])
        with torch.no_grad():
            ref = here(ids).logits[0, -1, :8]
            gen = here.generate(ids, max_new_tokens=5, do_sample=False)
            # each decoding step there (latent cache) against a full forward here of the same prefix, no cache
            steps = torch.stack([here(generated[:, : 12 + t], use_cache=False).logits[0, -1] for t in range(5)])
        assert got["type"] == "mla_retrofit" and got["base"] == "MLAModel", out
        assert torch.allclose(torch.tensor(got["logits"]), ref, atol=1e-4), out
        assert (torch.tensor(got["steps"]) - steps).abs().max().item() < 1e-4, out
        assert got["generated"] == gen[0].tolist(), out
        assert got["cache_last_dims"] == [here.config.layer_kv_lora_rank(0), here.config.layer_rope_dim(0)], out


@pytest.mark.slow
@pytest.mark.network
def test_stock_lm_eval_without_this_project(tiny_models, tmp_path, monkeypatch):
    """A venv with torch, transformers and lm-eval only: the stock CLI runs a local task on an export, from a clone."""
    import importlib.metadata
    import json
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (out,) = _exports(tiny_models, tmp_path)
    py = fresh_venv(transformers.__version__, f"lm-eval[hf]=={importlib.metadata.version('lm-eval')}")
    probe = "import importlib.util as u; print(u.find_spec('convert'), u.find_spec('eval'))"
    check = subprocess.run([py, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert check.stdout.split() == ["None", "None"]
    from eval import bigbench

    standin = {"MLA_RETROFIT_CACHE": str(tmp_path / "bb-cache"),  # BIG-bench tasks from a stand-in sdist
               "MLA_BIGBENCH_SDIST": str(fake_bigbench_sdist(tmp_path / bigbench.SDIST))}
    run = subprocess.run(
        [str(Path(py).with_name("lm_eval")), "--model", "hf", "--model_args", f"pretrained={out},trust_remote_code=True",
         "--include_path", str(repo / "eval" / "tasks"), "--tasks", "mla_bb_goal_step", "--limit", "4",
         "--output_path", str(tmp_path / "res")],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **standin})
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "res").rglob("results_*.json")).read_text())
    assert results["n-samples"]["mla_bb_goal_step"]["effective"] == 4
    for key, value in standin.items():  # the same stand-in documents here
        monkeypatch.setenv(key, value)
    acc, _ = multiple_choice_accuracy(out, "mla_bb_goal_step", 4, repo / "eval" / "tasks")  # scored apart, here
    assert results["results"]["mla_bb_goal_step"]["acc,none"] == pytest.approx(acc, abs=1e-9)
