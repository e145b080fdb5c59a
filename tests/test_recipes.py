"""Every shipped recipe parses, names only known keys and validates; its header gives the exact command."""

from pathlib import Path

import pytest

from convert.config import ConvertConfig, load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid(path):
    values = load_recipe(path)
    cfg = ConvertConfig(**values)
    cfg.validate()
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("mla convert" in line and "--recipe recipes/" + path.name in line for line in header)
