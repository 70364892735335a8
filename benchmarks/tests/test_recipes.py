"""benchmarks.recipes: every recipe is a valid set of model options, recipes combine with +, and the table puts the
seed's published row first and each recipe's job speed over the first recipe's."""

import argparse

import pytest

from benchmarks.recipes import RECIPES, recipe_options, table
from nota_model.config import load_config
from nota_model.overrides import parse_overrides


@pytest.mark.parametrize("model", ["tiny", "nota-small"])
def test_every_recipe_is_a_valid_set_of_model_options(model):
    for recipe in RECIPES:
        load_config(model, parse_overrides(recipe_options(recipe)))


def test_recipes_combine_with_plus_and_an_unknown_name_is_refused():
    combined = load_config("tiny", parse_overrides(recipe_options("merged-lora+int8+half-tokens")))
    assert (combined.lora.merge, combined.llm.quantization, combined.qformer.pool_tokens) == (True, "int8", 2)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown recipe int4"):
        recipe_options("merged-lora+int4")


def test_the_table_starts_with_the_seeds_published_figures_and_compares_to_the_first_recipe():
    rows = [{"recipe": name, "job_items_per_s": speed, "wer_librivox": None, "wer_dev": None}
            for name, speed in (("baseline", 2.0), ("int8", 3.0))]
    lines = table("tiny", "a CPU", rows).splitlines()
    assert lines[2].startswith("| NOTA seed") and "| 0.1722 | 0.038 |" in lines[2]
    cells = {line.split(" | ")[1]: line.split(" | ") for line in lines[3:]}
    header = lines[0].split(" | ")
    assert cells["baseline"][header.index("job items/s / first")] == "1.0"
    assert cells["int8"][header.index("job items/s / first")] == "1.5"
