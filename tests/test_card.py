"""The model card (README.md) in every export: mla convert in both formats and mla finetune after each. It loads with
huggingface_hub's ModelCard, its metadata are the source as given and its license, and its KV-cache figures are the
ones config.json implies (computed here from the config, apart from the conversion record)."""

import json
import shlex

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import convert_tiny, make_tiny
from convert.cli import parse
from convert.config import parse_overrides
from convert.recover import finetune
from convert.recover.config import RecoverConfig

TAGS = ["mla", "kv-cache", "mla-retrofit"]
SOURCE_CARD = "---\nlicense: mit\n---\n\n# A tiny source model\n\nIts own card, which no export copies.\n"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny GQA Llama with its own model card (license mit), converted in both formats and then recovered."""
    import pydoc_data.topics

    root = tmp_path_factory.mktemp("card")
    make_tiny(root / "src", "llama-gqa")
    (root / "src" / "README.md").write_text(SOURCE_CARD)
    topics = list(pydoc_data.topics.topics.values())
    (root / "train.txt").write_text("\n\n".join(topics[: len(topics) // 2]))
    (root / "val.txt").write_text("\n\n".join(topics[len(topics) // 2:]))
    out = {}
    for fmt in ("mla", "deepseek_v3"):
        convert_tiny(root / "src", root / fmt, kv_budget=0.3125, format=fmt, seed=3)
        out[fmt] = root / fmt
    # a converted folder holding someone else's README.md: recovery writes ours instead
    (root / "mla" / "README.md").rename(root / "mla-card.md")
    (root / "mla" / "README.md").write_text(SOURCE_CARD)
    cfg = RecoverConfig(data=str(root / "train.txt"), val_data=str(root / "val.txt"), seq_len=64, batch_size=2,
                        tokens=64 * 2 * 2, val_tokens=128, eval_every=1, lr=3e-3, warmup_steps=1)
    for fmt in ("mla", "deepseek_v3"):
        finetune(root / fmt, root / f"{fmt}-rec", cfg, log=lambda *_: None)
        out[f"{fmt}-rec"] = root / f"{fmt}-rec"
    (root / "mla" / "README.md").unlink()
    (root / "mla-card.md").rename(root / "mla" / "README.md")
    return root, out


def _expected_cache(folder, src) -> tuple[int, int, int]:
    """KV values per token (original, export) summed over layers and bytes per value, from the config files alone."""
    source = json.loads((src / "config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    layers = source["num_hidden_layers"]
    original = 2 * source["num_key_value_heads"] * source["head_dim"] * layers
    rank, rope = config["kv_lora_rank"], config["qk_rope_head_dim"]
    if isinstance(rank, list):
        export = sum(rank) + sum(rope)
    else:
        export = (rank + rope) * layers
    return original, export, torch.empty((), dtype=getattr(torch, source["dtype"])).element_size()


@pytest.mark.parametrize("name", ["mla", "deepseek_v3", "mla-rec", "deepseek_v3-rec"])
def test_every_export_has_a_model_card_with_the_records_metadata(exports, name):
    root, out = exports
    folder = out[name]
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == str(root / "src")  # the source as given
    assert card.data.license == "mit"  # the source card's license
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == TAGS
    assert "Its own card" not in card.text  # linked, not copied
    original, export, size = _expected_cache(folder, root / "src")
    assert f"| original | {original} | {original * size} |" in card.text
    assert f"| this export | {export} | {export * size} |" in card.text
    config = json.loads((folder / "config.json").read_text())
    if config["model_type"] == "deepseek_v3":
        assert "from_pretrained(path)" in card.text and "trust_remote_code" not in card.text
    else:
        assert "from_pretrained(path, trust_remote_code=True)" in card.text
    assert "top-1 agreement" in card.text
    assert ("## Recovery" in card.text) == name.endswith("-rec")
    if name.endswith("-rec"):
        record = json.loads((folder / "mla_conversion.json").read_text())
        assert f"{record['recovery']['val'][-1]['ratio']:.3f}x after" in card.text
    assert str(folder) not in card.text and "tmp-" not in card.text  # nothing of where it was written


@pytest.mark.parametrize("name", ["mla", "deepseek_v3-rec"])
def test_the_cards_commands_are_mla_commands_that_parse(exports, name):
    _, out = exports
    text = (out[name] / "README.md").read_text()
    block = text.split("## How it was made", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["mla", "convert"]] + ([["mla", "finetune"]] if "rec" in name else [])
    for words in commands:
        args = parse(words[1:])
        if words[1] == "finetune":
            parse_overrides(args.overrides, RecoverConfig)
    convert = parse(commands[0][1:])
    assert convert.kv_budget == 0.3125 and convert.seed == 3 and convert.calib == "pydoc"


def test_a_fixed_seed_gives_the_same_card(exports, tmp_path):
    root, out = exports
    convert_tiny(root / "src", tmp_path / "again", kv_budget=0.3125, format="mla", seed=3)
    assert (tmp_path / "again" / "README.md").read_text() == (out["mla"] / "README.md").read_text()


def test_a_source_without_a_license_gives_none(tiny_models, tmp_path):
    convert_tiny(tiny_models["llama-mqa"], tmp_path / "out", kv_budget=0.5)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license is None and card.data.base_model == str(tiny_models["llama-mqa"])
    assert "a local folder" in card.text
