"""The federation planner: one schedule, a certified sigma per holder for the whole plan, skips with reasons."""

import json

import pytest

from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.coordinator.planner import FederationSettings, HolderDescription, plan_federation
from support.daemon import trainer  # noqa: F401 - the tiny model the real daemon trains

SETTINGS = FederationSettings(
    rounds=2, local_steps=5, expected_batch_size=20, clip_norm=1.0, learning_rate=0.01, target_epsilon=4.0, delta=1e-5
)


def _holder(holder_id, size=200, budget=8.0, spent=0.0, delta=1e-5, node_id=None):
    return HolderDescription.from_config(
        {
            "holder_id": holder_id,
            "dataset_size": size,
            "budget_epsilon": budget,
            "budget_delta": delta,
            "spent_epsilon_certified": spent,
            "public_key": "key-" + holder_id,
            "model_id": "m",
        },
        node_id=node_id if node_id is not None else abs(hash(holder_id)) % 1000,
    )


def _whole_plan_epsilon(plan, delta):
    return certified_epsilon(PoissonGaussianEvent(plan.sampling_rate, plan.noise_multiplier, SETTINGS.total_steps), delta)


def test_every_holder_is_calibrated_to_min_of_target_and_budget_left():
    plan = plan_federation(SETTINGS, [_holder("a"), _holder("b", size=400), _holder("c", budget=5.0, spent=3.0)])
    by_holder = plan.by_holder()
    assert not plan.skipped
    assert by_holder["a"].sampling_rate == pytest.approx(0.1)
    assert by_holder["b"].sampling_rate == pytest.approx(0.05)
    assert by_holder["c"].epsilon_target == pytest.approx(2.0)  # budget left 2 < target 4
    for holder_id, cap in (("a", 4.0), ("b", 4.0), ("c", 2.0)):
        holder_plan = by_holder[holder_id]
        epsilon = _whole_plan_epsilon(holder_plan, 1e-5)
        assert epsilon <= cap + 1e-9
        assert epsilon > 0.95 * cap  # not over-noised: sigma is the calibrated one
        assert holder_plan.epsilon_certified == pytest.approx(epsilon, rel=1e-6)
    assert by_holder["c"].noise_multiplier > by_holder["a"].noise_multiplier > by_holder["b"].noise_multiplier


def test_holder_delta_below_the_federation_delta_is_used():
    plan = plan_federation(SETTINGS, [_holder("a", delta=1e-7)])
    holder_plan = plan.holders[0]
    assert holder_plan.delta == 1e-7
    assert _whole_plan_epsilon(holder_plan, 1e-7) <= 4.0 + 1e-9


def test_holders_that_cannot_fund_the_plan_are_skipped_with_the_reason():
    settings = FederationSettings(**{**SETTINGS.__dict__, "max_noise_multiplier": 5.0})
    plan = plan_federation(settings, [_holder("a"), _holder("spent", budget=3.0, spent=3.0), _holder("poor", budget=0.05)])
    assert [p.holder_id for p in plan.holders] == ["a"]
    reasons = {s.holder.holder_id: s.reason for s in plan.skipped}
    assert "spent" in reasons["spent"]
    assert "noise multiplier" in reasons["poor"] and "> 5" in reasons["poor"]


def test_too_few_holders_left_is_an_error_naming_the_reasons():
    settings = FederationSettings(**{**SETTINGS.__dict__, "min_holders": 2})
    with pytest.raises(InvalidInputError, match="only 1 holder.*spent"):
        plan_federation(settings, [_holder("a"), _holder("spent", budget=3.0, spent=3.0)])


def test_two_nodes_claiming_one_holder_id_are_refused():
    with pytest.raises(InvalidInputError, match="two nodes claim"):
        plan_federation(SETTINGS, [_holder("a", node_id=1), _holder("a", node_id=2)])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dataset_size": 0}, "dataset_size"),
        ({"budget_epsilon": -1.0}, "budget_epsilon"),
        ({"public_key": ""}, "public_key"),
        ({"spent_epsilon_certified": float("nan")}, "spent_epsilon_certified"),
    ],
)
def test_malformed_descriptions_are_refused(change, message):
    values = {"holder_id": "a", "dataset_size": 10, "budget_epsilon": 1.0, "budget_delta": 1e-5, "spent_epsilon_certified": 0.0, "public_key": "k", **change}
    with pytest.raises(InvalidInputError, match=message):
        HolderDescription.from_config(values, node_id=1)


def test_description_lacking_fields_is_refused():
    with pytest.raises(InvalidInputError, match="lacks"):
        HolderDescription.from_config({"holder_id": "a"}, node_id=1)


@pytest.mark.parametrize("field, value", [("rounds", 0), ("delta", 1.0), ("target_epsilon", -1), ("local_steps", 1.5)])
def test_invalid_settings_are_refused(field, value):
    with pytest.raises(InvalidInputError):
        FederationSettings(**{**SETTINGS.__dict__, field: value})


def test_planned_rates_are_the_rates_the_sampler_executes():
    """B / N is rarely on the sampler's 2^-53 grid (16 / 107 is not); the plan names the executed rate, so the
    holder's receipt (which records what ran) equals the plan exactly and the receipt check can demand it."""
    from ewtune.accountant.sampling import executable_sampling_rate

    settings = FederationSettings(rounds=2, local_steps=3, expected_batch_size=16, clip_norm=1.0, learning_rate=0.01,
                                  target_epsilon=8.0, delta=1e-5)
    (plan,) = plan_federation(settings, [_holder("odd", 107)]).holders
    assert plan.sampling_rate != 16 / 107
    assert plan.sampling_rate == executable_sampling_rate(16 / 107) == executable_sampling_rate(plan.sampling_rate)


def _with_floors(holder_id, **floors):
    description = dict(
        holder_id=holder_id, dataset_size=200, budget_epsilon=1000.0, budget_delta=1e-5, spent_epsilon_certified=0.0,
        public_key="key-" + holder_id, model_id="m", **floors,
    )
    return HolderDescription.from_config(description, node_id=7)


def test_the_plan_meets_each_holders_floors():
    """A daemon refuses a sigma below its minimum or an expected batch below its minimum: the planner raises
    sigma to the floor (epsilon only falls) and skips a holder whose expected batch is too small."""
    generous = FederationSettings(
        rounds=1, local_steps=2, expected_batch_size=20, clip_norm=1.0, learning_rate=0.01, target_epsilon=20.0, delta=1e-5
    )
    unconstrained = plan_federation(generous, [_with_floors("a")]).by_holder()["a"]
    assert unconstrained.noise_multiplier < 0.5
    plan = plan_federation(generous, [_with_floors("a", min_noise_multiplier=0.5), _with_floors("b", min_expected_batch=30)])
    planned = plan.by_holder()["a"]
    assert planned.noise_multiplier == 0.5
    assert planned.epsilon_certified == pytest.approx(
        certified_epsilon(PoissonGaussianEvent(planned.sampling_rate, 0.5, 2), 1e-5)
    )
    assert [(s.holder.holder_id, "below its minimum 30" in s.reason) for s in plan.skipped] == [("b", True)]


def test_a_delta_not_below_one_over_n_skips_the_holder():
    wide = FederationSettings(rounds=1, local_steps=2, expected_batch_size=20, clip_norm=1.0, learning_rate=0.01,
                              target_epsilon=8.0, delta=0.005, min_holders=1)
    plan = plan_federation(wide, [_holder("small", size=100, delta=0.005), _holder("large", size=1000, delta=0.005)])
    assert [s.holder.holder_id for s in plan.skipped] == ["large"] and "1/N = 1/1000" in plan.skipped[0].reason
    assert [p.holder_id for p in plan.holders] == ["small"]


def _rows(*events):
    from ewtune.accountant.events import compose
    from ewtune.accountant.spend import mechanism_rows

    return json.dumps(mechanism_rows(compose(*events)))


def _stating_events(holder_id, events, budget=8.0, size=200):
    """A description that states its ledger's events, as a daemon's does (spent_mechanisms)."""
    from ewtune.accountant.events import compose

    spent = certified_epsilon(compose(*events), 1e-5)
    return HolderDescription.from_config({
        "holder_id": holder_id, "dataset_size": size, "budget_epsilon": budget, "budget_delta": 1e-5,
        "spent_epsilon_certified": spent, "public_key": "key-" + holder_id, "spent_mechanisms": _rows(*events),
    }, node_id=3)  # fmt: skip


def test_the_plan_composes_the_spent_events_instead_of_subtracting_epsilons():
    """Budget 8 = target 8, a count released at sigma 20 (epsilon about 0.16 alone): subtracting would plan the
    run to 7.84; composed with the plan, as the holder's ledger accounts it, the count costs a few thousandths."""
    from ewtune.accountant.events import compose

    settings = FederationSettings(rounds=2, local_steps=5, expected_batch_size=20, clip_norm=1.0, learning_rate=0.01,
                                  target_epsilon=8.0, delta=1e-5)
    count = PoissonGaussianEvent(1.0, 20.0, 1)
    (plan,) = plan_federation(settings, [_stating_events("a", [count])]).holders
    assert plan.warning is None
    whole = PoissonGaussianEvent(plan.sampling_rate, plan.noise_multiplier, settings.total_steps)
    assert certified_epsilon(compose(count, whole), 1e-5) <= 8.0  # the holder's budget, as its ledger composes it
    assert plan.epsilon_certified > 8.0 - certified_epsilon(count, 1e-5) + 0.1  # well above the subtracted 7.84
    assert plan.epsilon_certified == pytest.approx(certified_epsilon(whole, 1e-5))


def test_a_malformed_spent_mechanisms_is_refused_naming_the_node():
    values = {"holder_id": "a", "dataset_size": 10, "budget_epsilon": 1.0, "budget_delta": 1e-5, "spent_epsilon_certified": 0.0,
              "public_key": "k"}
    for bad in ("not json", json.dumps([{"sampling_rate": 2.0, "noise_multiplier": 1.0, "steps": 1, "neighbouring": "add_remove"}]),
                json.dumps([{}] * 300), "{}"):
        with pytest.raises(InvalidInputError, match="node 1's spent_mechanisms is malformed"):
            HolderDescription.from_config({**values, "spent_mechanisms": bad}, node_id=1)


def test_a_nearly_spent_budget_is_planned_with_a_warning_naming_the_holder():
    """The holder has spent nearly all of its 8: the noise that keeps the plan within it is far above what a fresh
    budget gives, so the plan carries a plain warning (the coordinator prints it) with the budget left."""
    from ewtune.coordinator.planner import USELESS_SIGMA_RATIO

    nearly, much = PoissonGaussianEvent(0.1, 1.547, 500), PoissonGaussianEvent(0.1, 1.55, 500)  # 7.993 and 7.970 of 8
    (fresh,) = plan_federation(SETTINGS, [_holder("fresh")]).holders
    plan = plan_federation(SETTINGS, [_stating_events("nearly", [nearly]), _stating_events("much", [much]), _holder("fresh")]).by_holder()
    assert plan["fresh"].warning is None
    # 0.03 left still buys a sigma under 4 times the fresh one (composition is kind to a small plan after a
    # large spend); 0.007 left does not
    assert plan["much"].warning is None and plan["much"].noise_multiplier < USELESS_SIGMA_RATIO * fresh.noise_multiplier
    warning = plan["nearly"].warning
    left = 8.0 - certified_epsilon(nearly, 1e-5)
    assert 0 < left < 0.01 and plan["nearly"].noise_multiplier > USELESS_SIGMA_RATIO * fresh.noise_multiplier
    assert warning.startswith(f"holder nearly has epsilon {left:.4g} of 8 left") and "mostly noise" in warning


def test_the_real_daemon_accepts_the_composed_plan_to_the_last_thousandths_of_its_budget(tmp_path, trainer):
    """Through the daemon's own check (its ledger's events with each round reserved, composed): the plan from its
    Describe reply is accepted round after round and brings the ledger to within 0.01 of the budget of 8, where
    subtracting the count's epsilon stopped at about 7.84 plus the count; a noise 3% lower than planned, for the
    second round alone, is refused."""
    from ewtune.accountant.ledger import Ledger
    from ewtune.accountant.signing import SigningKey
    from ewtune.agent.daemon import Daemon
    from ewtune.agent.policy import HolderPolicy, PlanRefused
    from support.daemon import BUDGET, HOLDER, PLAN, _global_weights

    key = SigningKey.generate()
    daemon = Daemon(HOLDER, HolderPolicy(**BUDGET), trainer, Ledger.create(tmp_path / "ledger.jsonl", key, HOLDER, BUDGET), key)
    settings = FederationSettings(rounds=2, local_steps=3, expected_batch_size=20.0, clip_norm=1.0, learning_rate=0.01,
                                  target_epsilon=8.0, delta=1e-5)
    holder = HolderDescription.from_config(daemon.describe(), node_id=1)
    assert holder.spent_events == (PoissonGaussianEvent(1.0, 20.0, 1),)  # the released count
    (plan,) = plan_federation(settings, [holder]).holders
    request = dict(PLAN, steps=3, sampling_rate=plan.sampling_rate, noise_multiplier=plan.noise_multiplier)
    daemon.train(_global_weights(trainer), dict(request, round=1))
    with pytest.raises(PlanRefused, match="over its budget 8"):
        daemon.train(_global_weights(trainer), dict(request, round=2, noise_multiplier=plan.noise_multiplier * 0.97))
    daemon.train(_global_weights(trainer), dict(request, round=2))
    spent = daemon.describe()["spent_epsilon_certified"]
    assert 7.99 < spent <= 8.0, spent
    daemon.close()
