"""Exports work on each supported transformers minor version (the matrix of TESTED_TRANSFORMERS), each in a fresh
virtualenv holding only torch + that transformers: greedy generation with and without the cache equals the source
model's (with a static cache too), a manual decode loop passes the cache by the name the running version reads, and nothing warns about the
renamed `past_key_values` argument. Older versions are refused in one line, newer ones warned about.

The venvs are cached across sessions (tests/conftest.py: fresh_venv): the first run builds one per version, about a
minute each on 2 CPU cores (4 here: 5.22 to 5.25); afterwards each version's check takes 5 to 10 seconds."""

import json
import re
import subprocess
import textwrap
import tomllib
import warnings
from pathlib import Path

import pytest

from conftest import convert_tiny, fresh_venv, make_tiny
from mla_modeling.configuration_mla import TESTED_TRANSFORMERS, check_transformers_version

VERSIONS = ["5.23.0", "5.24.0", "5.25.0"]  # one per minor version of TESTED_TRANSFORMERS
LOW, HIGH = (".".join(map(str, v)) for v in TESTED_TRANSFORMERS)

# Runs in the fresh venv: argv[1] is a JSON list of [name, export folder, source folder]; prints one JSON object.
SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, logging, sys, warnings
    import torch, transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert importlib.util.find_spec("convert") is None and importlib.util.find_spec("mla_modeling") is None
    transformers.logging.set_verbosity_warning()
    NEW = tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (5, 24)
    CACHE_ARG = CACHE_FIELD = "cache" if NEW else "past_key_values"  # renamed in 5.24
    PROMPTS = ["The quick brown fox jumps over", "def main():\\n    return", "In the beginning", "import os"]
    PAIR = ["Return the value of", "x"]  # a batch of 2 of different lengths: left padding


    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(f"log {record.levelname}: {record.getMessage()}")


    def watched(fn):
        \"\"\"fn()'s result and every warning it raised, by the warnings module or by transformers' logger.\"\"\"
        once = getattr(transformers.utils.logging, "warning_once", None)
        if hasattr(once, "cache_clear"):  # logger.warning_once says a message once per process
            once.cache_clear()
        handler, logger = Records(), logging.getLogger("transformers")
        logger.addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = fn()
        finally:
            logger.removeHandler(handler)
        return result, [f"{w.category.__name__}: {w.message}" for w in caught] + handler.messages


    def greedy(model, batch, use_cache, **kw):
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=use_cache, **kw)
        return out[:, batch["input_ids"].shape[1]:].tolist()


    def manual_decode(model, ids, steps=12):
        \"\"\"Greedy tokens of a prefill then one token at a time on the model's cache (passed by CACHE_ARG, read from
        CACHE_FIELD), and the largest difference of those steps' logits to a full forward without cache.\"\"\"
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            logits, tokens = [], []
            for _ in range(steps):
                cache = getattr(out, CACHE_FIELD)
                assert cache is not None, CACHE_FIELD
                logits.append(out.logits[:, -1])
                tokens.append(out.logits[:, -1:].argmax(-1))
                out = model(input_ids=tokens[-1], use_cache=True, **{CACHE_ARG: cache})
            seq = torch.cat([ids, *tokens], 1)
            full = model(input_ids=seq[:, :-1], use_cache=False).logits[:, ids.shape[1] - 1:]
        return torch.cat(tokens, 1)[0].tolist(), (torch.stack(logits, 1) - full).abs().max().item()


    result = {"transformers": transformers.__version__, "torch": torch.__version__, "exports": {}}
    for name, export, source in json.loads(sys.argv[1]):
        tok = AutoTokenizer.from_pretrained(source)
        tok.padding_side = "left"
        batches = {p: tok([p], return_tensors="pt") for p in PROMPTS}
        batches["pair"] = tok(PAIR, return_tensors="pt", padding=True)
        assert (batches["pair"]["attention_mask"] == 0).any()
        model, load_warnings = watched(lambda: AutoModelForCausalLM.from_pretrained(
            export, trust_remote_code=True, dtype=torch.float32).eval())
        got = {"class": type(model).__name__, "load_warnings": load_warnings, "cached": {}, "uncached": {},
               "static": {}, "source": {}}

        def run():
            for key, batch in batches.items():
                got["cached"][key] = greedy(model, batch, True)
                got["uncached"][key] = greedy(model, batch, False)
                got["static"][key] = greedy(model, batch, True, cache_implementation="static")
            return manual_decode(model, batches[PROMPTS[0]]["input_ids"])

        (got["manual"], got["manual_max_diff"]), got["generate_warnings"] = watched(run)
        ref = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        for key, batch in batches.items():
            got["source"][key] = greedy(ref, batch, True)
        result["exports"][name] = got
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def version_exports(tmp_path_factory) -> list:
    """[name, export, source] of tiny exports at --kv-budget 1: a Llama (GQA) and a Qwen3 (QK-norm) in the mla format
    (lossless), and the Llama as a stock DeepSeek-V3 checkpoint (not lossless: one RoPE key for all heads and a latent
    norm, but the same greedy tokens here)."""
    root = tmp_path_factory.mktemp("versions")
    for name in ("llama-gqa", "qwen3"):
        make_tiny(root / f"src-{name}", name)
    exports = [("llama-gqa", {}), ("qwen3", {}), ("llama-gqa-deepseek_v3", {"format": "deepseek_v3"})]
    rows = []
    for name, settings in exports:
        source = root / f"src-{name.split('-deepseek')[0]}"
        convert_tiny(source, root / name, kv_budget=1.0, **settings)
        rows.append([name, str(root / name), str(source)])
    return rows


def test_the_matrix_is_the_tested_range_and_the_pinned_range():
    minors = [tuple(int(p) for p in v.split(".")[:2]) for v in VERSIONS]
    assert minors == [(5, m) for m in range(TESTED_TRANSFORMERS[0][1], TESTED_TRANSFORMERS[1][1] + 1)]
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    pin = next(d for d in pyproject["project"]["dependencies"] if re.match(r"transformers\b", d))
    assert pin == f"transformers>={LOW},<5.{TESTED_TRANSFORMERS[1][1] + 1}", pin


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("version", VERSIONS)
def test_exports_generate_like_their_source_on_each_transformers_version(version_exports, version, tmp_path):
    py = fresh_venv(version)
    run = subprocess.run([py, "-c", SCRIPT, json.dumps(version_exports)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["transformers"] == version
    assert set(result["exports"]) == {name for name, _, _ in version_exports}
    for name, got in result["exports"].items():
        assert got["class"] == ("DeepseekV3ForCausalLM" if "deepseek" in name else "MLAForCausalLM"), name
        assert got["cached"] == got["uncached"], name
        assert got["static"] == got["cached"], name  # generate(cache_implementation="static")
        assert got["cached"] == got["source"], name
        first = got["cached"]["The quick brown fox jumps over"][0]
        assert got["manual"][: len(first)] == first, name  # generate may stop early at EOS
        assert got["manual_max_diff"] < 1e-4, (name, got["manual_max_diff"])
        assert not [w for w in got["generate_warnings"] if "past_key_values" in w], (name, got["generate_warnings"])
        assert not [w for w in got["load_warnings"] if "tested with transformers" in w], (name, got["load_warnings"])


@pytest.mark.parametrize("version", ["5.22.9", "5.22.0", "4.57.6"])
def test_older_transformers_is_refused_in_one_line(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImportError) as err:
            check_transformers_version(version)
    message = str(err.value)
    assert "\n" not in message and f"tested {LOW} to {HIGH}" in message and version in message, message


def test_newer_transformers_warns_once_naming_the_range():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_transformers_version("5.26.0")
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "\n" not in message and f"{LOW} to {HIGH}" in message and "5.26.0" in message, message


@pytest.mark.parametrize("version", ["5.23.0", "5.24.2", "5.25.0", "5.25.1", "5.25.0.dev0"])
def test_tested_transformers_is_silent(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_transformers_version(version)


@pytest.mark.slow
@pytest.mark.network
def test_an_export_is_refused_by_transformers_5_22_in_one_line(version_exports, tmp_path):
    py = fresh_venv("5.22.0")
    _, export, _ = version_exports[0]
    script = textwrap.dedent(
        """
        import json, sys, transformers
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
            error = None
        except Exception as e:
            error = {"type": type(e).__name__, "message": str(e)}
        print(json.dumps({"transformers": transformers.__version__, "error": error}))
        """
    )
    run = subprocess.run([py, "-c", script, export], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["transformers"] == "5.22.0"
    assert result["error"] is not None and result["error"]["type"] == "ImportError", result
    message = result["error"]["message"]
    assert "\n" not in message and f"tested {LOW} to {HIGH}" in message and "found 5.22.0" in message, message
