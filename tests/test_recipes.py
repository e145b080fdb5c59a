"""Every shipped recipe parses, names only known keys and validates; its header gives the exact command."""

from pathlib import Path

import pytest

from convert.config import ConvertConfig, has_section, load_recipe, read_recipe
from convert.recover.config import RecoverConfig

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES
    assert any(has_section(path, "recover") for path in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid(path):
    ConvertConfig(**load_recipe(path)).validate()
    if has_section(path, "recover"):
        cfg = RecoverConfig(**load_recipe(path, "recover", RecoverConfig))
        cfg.validate()
        # evaluation text is never training text
        assert cfg.val_data not in cfg.data.split(",")
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    source = read_recipe(path).get("source")
    command = ("mla finetune " if not has_section(path, "convert") else  # a recipe that only recovers
               f"mla convert {source} " if source else "mla convert SRC ")
    assert any(command in line and "--recipe recipes/" + path.name in line for line in header)


def test_unknown_recover_key_is_named(tmp_path):
    from convert.errors import MLAError

    bad = tmp_path / "bad.yaml"
    bad.write_text("recover:\n  lr: 0.001\n  lora_rank: 8\n")
    with pytest.raises(MLAError, match=r"unknown key recover.'lora_rank'"):
        load_recipe(bad, "recover", RecoverConfig)
    bad.write_text("recover:\n  tokens: many\n")
    with pytest.raises(MLAError, match="recover: tokens must be int"):
        load_recipe(bad, "recover", RecoverConfig)
