"""The default recipe (ewtune/agent/recipe.py): its probe settings by budget, explicit settings first, and what
train-local builds from its arguments."""

import argparse
import math

import pytest

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.recipe import LOW_EPSILON, LOW_EPSILON_PROBE, LPFT, MAX_DEFAULT_SAMPLING_RATE, MIN_DEFAULT_BATCH, Recipe, default_recipe, fit_to_data
from ewtune.agent.train_cli import recipe_from_args, register


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
    return recipe_from_args(parser.parse_args(["train-local", "--model", "minilm", "--data", "mr", "--delta", "1e-5", *arguments]))


def test_train_local_takes_the_default_for_its_epsilon_unless_told():
    assert _train_local_recipe("--epsilon", "1").probe_expected_batch == 512
    assert _train_local_recipe("--epsilon", "8").probe_expected_batch == Recipe().probe_expected_batch
    told = _train_local_recipe("--epsilon", "1", "--probe-batch", "1024", "--probe-lr", "4")
    assert (told.probe_expected_batch, told.probe_learning_rate, told.probe_epochs) == (1024, 4.0, 10.0)


def test_defaults_that_fit_the_data_are_kept_and_say_nothing():
    fitted = fit_to_data(Recipe(), 20_000)
    assert fitted.recipe == Recipe() and fitted.choices == () and fitted.dataset_size == 20_000


def test_a_default_batch_over_a_quarter_of_the_data_is_lowered_and_the_epochs_kept():
    fitted = fit_to_data(Recipe(), 300)
    assert fitted.recipe.probe_expected_batch == 75 == math.floor(MAX_DEFAULT_SAMPLING_RATE * 300)
    assert fitted.recipe.probe_epochs == Recipe().probe_epochs
    ((phase,),) = [fitted.recipe.phases(300)]
    assert phase.sampling_rate == pytest.approx(0.25) and phase.steps == 80  # 20 epochs at q = 1/4
    (choice,) = fitted.choices
    assert "probe expected batch 75" in choice and "default 1024" in choice and "300 training records" in choice


def test_lpft_fits_both_phases_and_a_batch_the_user_set_is_kept():
    lpft = Recipe(**LPFT)
    fitted = fit_to_data(lpft, 400)
    assert (fitted.recipe.probe_expected_batch, fitted.recipe.tune_expected_batch) == (100, 100)
    assert [choice.split()[0] for choice in fitted.choices] == ["probe", "tune"]
    told = fit_to_data(Recipe(**LPFT, probe_expected_batch=300), 400, given={"probe_expected_batch"})
    assert (told.recipe.probe_expected_batch, told.recipe.tune_expected_batch) == (300, 100)


def test_a_batch_the_user_set_over_n_is_refused_with_what_fits():
    with pytest.raises(InvalidInputError, match=r"expected batch 500 exceeds the 300 training records: give --probe-batch 300 or less"):
        fit_to_data(Recipe(probe_expected_batch=500), 300, given={"probe_expected_batch"})


def test_too_few_records_for_any_default_are_refused_with_what_would_fit():
    assert fit_to_data(Recipe(), 64).recipe.probe_expected_batch == MIN_DEFAULT_BATCH
    with pytest.raises(InvalidInputError, match=r"63 training records are too few .* needs 64\): give --probe-batch \(at most 63\)"):
        fit_to_data(Recipe(), 63)
    # a batch the user chose is not held to the floor
    assert fit_to_data(Recipe(probe_expected_batch=8), 27, given={"probe_expected_batch"}).recipe.probe_expected_batch == 8
