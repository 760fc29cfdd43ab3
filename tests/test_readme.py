"""The README stays true: every config key and every objective is documented there."""

from pathlib import Path

from tropd.config import config_reference
from tropd.objectives import list_objectives

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_every_config_key_is_in_the_readme_with_its_default():
    for key, default, _ in config_reference():
        assert f"| `{key}` | `{default}` |" in README, key


def test_every_objective_is_in_the_method_table():
    for name in list_objectives():
        assert f"| `{name}` |" in README, name
