"""Recipes parse into the config objects; unknown or invalid fields fail with one clear message."""

import pytest
import yaml

from ftkit.config import (
    RECIPES_DIR,
    ConfigError,
    Recipe,
    parse_recipe,
    save_recipe,
    shipped_recipes,
)

TRAINING_RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def test_recipes_are_shipped():
    assert {"tiny", "llama2-7b", "bloom-1b7"} <= set(shipped_recipes())


@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_parses(path):
    recipe = parse_recipe(["--config", path.stem])
    values = yaml.safe_load(path.read_text())
    flat = recipe.to_dict()
    for key, value in values.items():
        assert flat[key] == pytest.approx(value) if isinstance(value, float) else flat[key] == value


def test_hub_recipes_name_the_hub_models():
    llama = parse_recipe(["--config", "llama2-7b"])
    bloom = parse_recipe(["--config", str(RECIPES_DIR / "bloom-1b7.yaml")])  # a path works too
    assert llama.model.model_name_or_path == "meta-llama/Llama-2-7b-hf"
    assert llama.adapter.lora_target == ["q_proj", "v_proj"]
    assert bloom.model.model_name_or_path == "bigscience/bloom-1b7"


def test_command_line_overrides_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("learning_rate: 2e-4\nlora_r: 8\nlora_target: [q_proj]\n")
    recipe = parse_recipe(
        ["--config", str(path), "--lora_r", "4", "--lora_target", "q_proj", "v_proj"]
    )
    assert recipe.train.learning_rate == 2e-4  # YAML 1.1 reads '2e-4' as a string: converted
    assert recipe.adapter.lora_r == 4
    assert recipe.adapter.lora_target == ["q_proj", "v_proj"]


def test_unknown_yaml_field_names_nearest(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lerning_rate: 0.1\n")
    with pytest.raises(
        ConfigError, match=r"unknown field 'lerning_rate'.*did you mean learning_rate"
    ):
        parse_recipe(["--config", str(path)])


def test_unknown_cli_flag_names_nearest():
    with pytest.raises(ConfigError, match=r"'lora_rank'.*did you mean lora_r"):
        parse_recipe(["--lora_rank", "4"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lora_impl", "lokr"], "lora_impl='lokr' is not one of"),
        (["--lora_dropout", "1.5"], "lora_dropout must be in"),
        (["--max_steps", "0"], "max_steps must be > 0"),
        (["--load_in_8bit", "true", "--load_in_4bit", "true"], "exclusive"),
        (["--config", "nope.yaml"], "recipe file not found: nope.yaml"),
    ],
)
def test_invalid_values_are_clear(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe(argv)


def test_resolved_recipe_round_trips(tmp_path):
    recipe = parse_recipe(["--lora_r", "3", "--gradient_checkpointing", "true"])
    save_recipe(recipe, tmp_path / "resolved.yaml")
    assert parse_recipe(["--config", str(tmp_path / "resolved.yaml")]) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_ddp_timeout_is_seconds_and_not_part_of_the_run_identity():
    from ftkit.rundir import fingerprint, identity_fields

    assert parse_recipe([]).train.ddp_timeout == 1800  # the HF Trainer's default
    with pytest.raises(ConfigError, match="ddp_timeout must be >= 1 second, got 0"):
        parse_recipe(["--ddp_timeout", "0"])
    short = parse_recipe(["--ddp_timeout", "20"])
    assert fingerprint(identity_fields(short)) == fingerprint(identity_fields(parse_recipe([])))
