"""What ``mla finetune`` writes is the model it trained: a tied input/output embedding stays right when an adapter
trains one of them, the remote code is this package's own, and the export is checked, as a user loads it, against
the trained model."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import convert_tiny, make_tiny
from convert.errors import MLAError
from convert.recover import finetune
from convert.recover.config import RecoverConfig
from convert.save import MODELING_DIR, REMOTE_CODE_FILES

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tiny Llama with tied input/output embeddings, converted at budget 0.25, and training / validation text."""
    import pydoc_data.topics

    root = tmp_path_factory.mktemp("tied")
    topics = list(pydoc_data.topics.topics.values())
    (root / "train.txt").write_text("\n\n".join(topics[:20])[:20000])  # more than the runs read
    (root / "val.txt").write_text("\n\n".join(topics[20:40])[:20000])
    make_tiny(root / "src", "llama-gqa")
    convert_tiny(root / "src", root / "conv", kv_budget=0.25)
    assert json.loads((root / "conv" / "config.json").read_text())["tie_word_embeddings"] is True
    return root


def _cfg(root: Path, **extra) -> RecoverConfig:
    """One optimizer step of 2 x 32 tokens at a high learning rate (every trained tensor moves visibly)."""
    args = dict(data=str(root / "train.txt"), val_data=str(root / "val.txt"), seq_len=32, batch_size=2,
                tokens=64, val_tokens=64, eval_every=10, lr=3e-2, warmup_steps=0)
    return RecoverConfig(**{**args, **extra})


def _ids():
    return torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits_as_a_user_loads(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _logits_of_the_adapter(conv: Path, adapter: Path) -> torch.Tensor:
    """The trained model rebuilt apart from the export: peft's own adapter, unmerged, on the converted model."""
    from peft import PeftModel

    from mla_modeling.modeling_mla import MLAForCausalLM

    model = PeftModel.from_pretrained(MLAForCausalLM.from_pretrained(conv, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        return model(input_ids=_ids()).logits


@pytest.mark.parametrize("targets, trained", [
    (dict(lora_targets="lm_head", full_targets="", val_data=""), HEAD),  # LoRA on the output head, no val text
    (dict(full_targets="embed_tokens"), EMBED),  # a trainable copy of the input embeddings, beside the MLP's LoRA
])
def test_an_adapter_on_one_of_tied_embeddings_unties_them(tied, tmp_path, targets, trained):
    out = tmp_path / "out"
    record = finetune(tied / "conv", out, _cfg(tied, **targets), log=lambda *_: None)
    before, after = load_file(tied / "conv" / "model.safetensors"), load_file(out / "model.safetensors")
    untouched = HEAD if trained == EMBED else EMBED
    assert torch.equal(after[untouched], before[EMBED])  # the matrix not trained is the original one
    assert not torch.equal(after[trained], before[EMBED])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert record["recovery"]["untied_embeddings"] is True
    assert record["recovery"]["verify"]["tokens"] == ("random" if targets.get("val_data") == "" else "val_data")
    expected = _logits_of_the_adapter(tied / "conv", out / "adapter")
    assert (_logits_as_a_user_loads(out) - expected).abs().max() < 1e-4


def test_training_a_tied_head_in_place_keeps_the_tie(tied, tmp_path):
    """All-parameter training: the one shared matrix trains, as in transformers; nothing is untied."""
    out = tmp_path / "out"
    record = finetune(tied / "conv", out, _cfg(tied, lora_targets="", full_targets="lm_head"), log=lambda *_: None)
    before, after = load_file(tied / "conv" / "model.safetensors"), load_file(out / "model.safetensors")
    assert HEAD not in after and not torch.equal(after[EMBED], before[EMBED])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert record["recovery"]["untied_embeddings"] is False


@pytest.mark.parametrize("val_data", ["val.txt", ""])
def test_the_export_check_compares_every_token_with_the_trained_model(tied, tmp_path, monkeypatch, val_data):
    """An export whose weights drift from the trained ones is refused even when its mean val perplexity matches
    (two steps: within 8e-4 in NLL here, 5e-3 per token), and without val_data too (checked on random tokens)."""
    import convert.recover.export as export

    written = export.save_state_dict

    def drifted(state, folder, *args, **kwargs):
        noise = torch.randn(state[EMBED].shape, generator=torch.Generator().manual_seed(1))
        return written({**state, EMBED: state[EMBED] + 5e-4 * noise}, folder, *args, **kwargs)

    monkeypatch.setattr(export, "save_state_dict", drifted)
    with pytest.raises(MLAError, match="does not reproduce the trained model"):
        finetune(tied / "conv", tmp_path / "out", _cfg(tied, tokens=128, val_data=val_data and str(tied / val_data)),
                 log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_the_remote_code_written_is_the_package_s_own(tied, tmp_path):
    """A converted model whose modeling_mla.py was edited (here: logits scaled) gets this package's code in OUT."""
    conv = tmp_path / "conv"
    shutil.copytree(tied / "conv", conv)
    path = conv / "modeling_mla.py"
    text = path.read_text()
    assert text.count("logits = self.lm_head(") == 1
    path.write_text(text.replace("logits = self.lm_head(", "logits = 1.5 * self.lm_head("))
    (conv / "configuration_mla.py").write_text((conv / "configuration_mla.py").read_text() + "\n# edited\n")
    out = tmp_path / "out"
    finetune(conv, out, _cfg(tied), log=lambda *_: None)
    for name in REMOTE_CODE_FILES:
        assert (out / name).read_bytes() == (MODELING_DIR / name).read_bytes(), name
    # the check imported that code from OUT's temporary folder: transformers' copy of it is not left in its cache
    from transformers.utils import HF_MODULES_CACHE

    copies = Path(HF_MODULES_CACHE) / "transformers_modules"
    assert not list(copies.glob(f"_dot_out_dot_tmp_hyphen_{os.getpid()}_hyphen_*"))


def test_the_export_is_verified_through_the_code_it_ships(tied, tmp_path, monkeypatch):
    """The check loads OUT with trust_remote_code, as a user does: code that computes another model is caught."""
    import convert.recover.export as export

    def broken_code(folder):
        for name in REMOTE_CODE_FILES:
            text = (MODELING_DIR / name).read_text()
            (folder / name).write_text(text.replace("logits = self.lm_head(", "logits = 1.5 * self.lm_head("))

    monkeypatch.setattr(export, "copy_remote_code", broken_code)
    with pytest.raises(MLAError, match="does not reproduce the trained model"):
        finetune(tied / "conv", tmp_path / "out", _cfg(tied), log=lambda *_: None)
    assert not (tmp_path / "out").exists()
