"""SRC forms: a Hub id (through a local stand-in of the Hub cache, offline) and a .gguf file."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import convert_tiny


def test_hub_id_through_local_hub_cache(tiny_models, tmp_path, monkeypatch):
    """A Hub id resolves through huggingface_hub's cache layout exactly as for an online user (offline here)."""
    hub = tmp_path / "hub"
    snapshot = hub / "models--tiny-org--tiny-llama" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_models["llama-gqa"], snapshot)
    (hub / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (hub / "models--tiny-org--tiny-llama" / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    record = convert_tiny("tiny-org/tiny-llama", tmp_path / "out", kv_budget=1.0)
    assert record["source"]["spec"] == "tiny-org/tiny-llama"
    assert record["verify"]["max_abs_logit_diff"] < 1e-4


def test_unreachable_hub_id_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from convert.cli import main

    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    assert main(["convert", "nobody-here/no-such-model", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no-such-model" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.network
def test_gguf_file_converts_losslessly_at_budget_one(tmp_path):
    """The real SmolLM2 GGUF given as a .gguf SRC; budget 1 reproduces its logits within 1e-4 (fp32)."""
    from convert.cache import cache_dir
    from convert.sources import resolve_source

    folder = resolve_source("smollm2-135m").path  # downloads once; keeps the GGUF beside the cache
    gguf = next(cache_dir("downloads", "smollm2-135m").glob("*.gguf"))
    record = convert_tiny(str(gguf), tmp_path / "out", kv_budget=1.0, calib_seqs=2, calib_len=128)
    assert record["source"]["description"].startswith("GGUF file")
    src = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    mla = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(100, 40000, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (src(ids).logits - mla(ids).logits).abs().max().item() < 1e-4
