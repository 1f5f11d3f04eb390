"""The default recipe (agent/recipe.py): its probe settings by budget, explicit settings first, and what
train-local builds from its arguments."""

import argparse

import pytest

from accountant.errors import InvalidInputError
from agent.recipe import LOW_EPSILON, LOW_EPSILON_PROBE, Recipe, default_recipe
from agent.train_cli import _recipe, register


def test_a_small_budget_gets_the_low_epsilon_probe_and_a_large_one_the_defaults():
    low, high = default_recipe(1.0), default_recipe(8.0)
    assert (low.probe_expected_batch, low.probe_epochs, low.probe_learning_rate) == (512, 10.0, 1.0)
    assert high == Recipe() and default_recipe(None) == Recipe()
    assert default_recipe(LOW_EPSILON) == Recipe()  # the boundary belongs to the large budgets
    assert default_recipe(LOW_EPSILON * 0.999).probe_expected_batch == LOW_EPSILON_PROBE["probe_expected_batch"]


def test_explicit_settings_win_over_either_default():
    assert default_recipe(1.0, probe_expected_batch=2048).probe_expected_batch == 2048
    assert default_recipe(1.0, probe_expected_batch=2048).probe_epochs == LOW_EPSILON_PROBE["probe_epochs"]
    with pytest.raises(InvalidInputError, match="probe-expected-batch"):
        default_recipe(1.0, probe_expected_batch=0)


def _train_local_recipe(*arguments):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return _recipe(parser.parse_args(["train-local", "--model", "minilm", "--data", "mr", "--delta", "1e-5", *arguments]))


def test_train_local_takes_the_default_for_its_epsilon_unless_told():
    assert _train_local_recipe("--epsilon", "1").probe_expected_batch == 512
    assert _train_local_recipe("--epsilon", "8").probe_expected_batch == Recipe().probe_expected_batch
    told = _train_local_recipe("--epsilon", "1", "--probe-batch", "1024", "--probe-lr", "4")
    assert (told.probe_expected_batch, told.probe_learning_rate, told.probe_epochs) == (1024, 4.0, 10.0)
