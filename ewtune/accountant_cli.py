"""``ewtune accountant epsilon`` and ``ewtune accountant sigma``.

Only argparse and the standard library are imported at module level, so that the whole ``ewtune``
command starts fast; the accountants (:func:`ewtune.accountant.accountants.standard_accountants`; scipy,
dp_accounting) are imported inside the handlers. Numbers are
parsed by the handlers rather than by argparse so that a malformed value gets the same one-line
``ewtune: error: ...`` (exit 2) as an out-of-range one.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any, Callable

from ewtune.accountant.errors import InvalidInputError

NEIGHBOURING_CHOICES = ("add_remove", "replace_one")


def register(subparsers) -> None:
    group = subparsers.add_parser(
        "accountant",
        help="privacy accounting: epsilon of a DP-SGD run, noise multiplier for a target",
        description="Certified epsilon (the guarantee) with the Edgeworth estimate and RDP beside it.",
    )
    commands = group.add_subparsers(dest="accountant_command", metavar="COMMAND", required=True)

    epsilon = commands.add_parser(
        "epsilon",
        help="epsilon of q, sigma, steps at delta: certified, Edgeworth orders 1-3, Edgeworth bound (RDP with --rdp)",
        description="Epsilon of the Poisson-subsampled Gaussian (DP-SGD) after STEPS steps. The certified "
        "value is the guarantee; the Edgeworth values are estimates shown beside it.",
    )
    _add_mechanism_arguments(epsilon)
    epsilon.add_argument("--noise-multiplier", required=True, metavar="S", help="sigma = noise std / clip norm")
    epsilon.add_argument("--delta", required=True, metavar="D", help="target delta, in (0, 0.1): a larger one guarantees nothing")
    epsilon.add_argument(
        "--rdp", action="store_true", help="also the RDP bound of dp_accounting (imports it: about a second more)"
    )
    epsilon.add_argument("--json", action="store_true", help="print one JSON object")
    epsilon.set_defaults(func=run_epsilon)

    sigma = commands.add_parser(
        "sigma",
        help="the noise multiplier for a target (epsilon, delta)",
        description="Calibrates the noise multiplier for a target (epsilon, delta) and prints the certified "
        "epsilon it yields.",
    )
    sigma.add_argument("--epsilon", required=True, metavar="E", help="target epsilon, > 0")
    sigma.add_argument("--delta", required=True, metavar="D", help="target delta, in (0, 0.1): a larger one guarantees nothing")
    _add_mechanism_arguments(sigma)
    sigma.add_argument(
        "--policy",
        choices=("certified", "edgeworth"),
        default="certified",
        help="certified (default): the certified epsilon meets the target; edgeworth: reproduce EW-Tune, "
        "which calibrated on the order-1 Edgeworth estimate (its certified epsilon exceeds the target)",
    )
    sigma.add_argument("--json", action="store_true", help="print one JSON object")
    sigma.set_defaults(func=run_sigma)


def _add_mechanism_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sampling-rate", required=True, metavar="Q", help="Poisson sampling rate, in (0, 1]")
    parser.add_argument("--steps", required=True, metavar="T", help="number of DP-SGD steps, >= 1")
    parser.add_argument(
        "--neighbouring", choices=NEIGHBOURING_CHOICES, default="add_remove", help="neighbouring relation"
    )


def run_epsilon(args: argparse.Namespace) -> int:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.accountant.events import Neighbouring, PoissonGaussianEvent

    event = PoissonGaussianEvent(
        _sampling_rate(args.sampling_rate),
        _positive(args.noise_multiplier, "noise multiplier"),
        _steps(args.steps),
        Neighbouring(args.neighbouring),
    )
    delta = _delta(args.delta)
    rows = _epsilon_rows(event, delta, args.rdp)
    if args.json:
        document: dict[str, Any] = {
            "sampling_rate": event.sampling_rate,
            "noise_multiplier": event.noise_multiplier,
            "steps": event.steps,
            "neighbouring": event.neighbouring.value,
            "delta": delta,
            "seconds": {},
        }
        for row in rows:
            document[row.key] = _json_number(row.value)
            document["seconds"][row.key] = round(row.seconds, 6)
            if row.note:
                document.setdefault("notes", {})[row.key] = row.note
        document["certified_accountant"] = _certified_accountant()
        print(json.dumps(document, sort_keys=True))
        return 0
    print(
        f"q={event.sampling_rate:g} sigma={event.noise_multiplier:g} steps={event.steps} "
        f"delta={delta:g} ({event.neighbouring.value})"
    )
    width = max(len(row.label) for row in rows)
    for row in rows:
        shown = f"{row.value:.4f}" if row.value is not None and math.isfinite(row.value) else (row.note or "n/a")
        print(f"  {row.label:<{width}}  {shown:>10}   {row.seconds:8.3f} s")
    print("The certified epsilon is the guarantee; Edgeworth estimates can fall below the true epsilon.")
    return 0


class _Row:
    def __init__(self, key: str, label: str, value: float | None, seconds: float, note: str | None = None):
        self.key, self.label, self.value, self.seconds, self.note = key, label, value, seconds, note


def _epsilon_rows(event, delta: float, rdp: bool) -> list[_Row]:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.accountant.accountants import standard_accountants

    rows = []
    for accountant in standard_accountants(rdp=rdp):
        key = f"epsilon_{accountant.name}"
        refusal = accountant.refusal(event)
        if refusal is not None:
            rows.append(_Row(key, accountant.label, None, 0.0, f"n/a: {refusal}"))
            continue
        value, seconds = _timed(lambda: accountant.compose(event).get_epsilon(delta))
        rows.append(_Row(key, accountant.label, value, seconds, None if value is not None else "vacuous"))
    return rows


def run_sigma(args: argparse.Namespace) -> int:
    target = _positive(args.epsilon, "epsilon")
    delta = _delta(args.delta)
    sampling_rate, steps = _sampling_rate(args.sampling_rate), _steps(args.steps)

    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.accountant.calibration import calibrate_noise_multiplier
    from ewtune.accountant.events import Neighbouring

    calibration = calibrate_noise_multiplier(
        target, delta, [(sampling_rate, steps)], policy=args.policy, neighbouring=Neighbouring(args.neighbouring)
    )
    meets_target = calibration.epsilon_certified <= target
    if args.json:
        print(
            json.dumps(
                {
                    "noise_multiplier": calibration.noise_multiplier,
                    "epsilon_certified": _json_number(calibration.epsilon_certified),
                    "epsilon_edgeworth": _json_number(calibration.epsilon_edgeworth),
                    "target_epsilon": target,
                    "delta": delta,
                    "sampling_rate": sampling_rate,
                    "steps": steps,
                    "neighbouring": args.neighbouring,
                    "policy": calibration.policy,
                    "certified_meets_target": meets_target,
                    "certified_evaluations": calibration.certified_evaluations,
                    "seconds": round(calibration.seconds, 6),
                    "certified_accountant": _certified_accountant(),
                },
                sort_keys=True,
            )
        )
        return 0
    print(f"noise multiplier: {calibration.noise_multiplier:.6g}   (policy: {calibration.policy})")
    print(f"  certified epsilon at this sigma: {calibration.epsilon_certified:.4f}   (target {target:g}, delta {delta:g})")
    print(f"  Edgeworth estimate (order 1, not a guarantee): {calibration.epsilon_edgeworth:.4f}")
    print(f"  {calibration.certified_evaluations} certified evaluations, {calibration.seconds:.2f} s")
    if not meets_target:
        print(
            f"WARNING: this sigma was calibrated on the Edgeworth estimate, as EW-Tune did; its certified "
            f"epsilon {calibration.epsilon_certified:.4f} is ABOVE the target {target:g}: the target is NOT "
            f"guaranteed. Use --policy certified for a guarantee."
        )
    return 0


def _certified_accountant() -> Any:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.accountant.certified import CERTIFIED_ACCOUNTANT

    return CERTIFIED_ACCOUNTANT


def _timed(compute: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = compute()
    return value, time.perf_counter() - start


def _json_number(value: float | None) -> float | None:
    """JSON has no infinity: a non-finite epsilon is written as null (the text output says 'inf')."""
    return value if value is not None and math.isfinite(value) else None


def _number(text: str, name: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be finite, got {text!r}")
    return value


def _positive(text: str, name: str) -> float:
    value = _number(text, name)
    if value <= 0:
        raise InvalidInputError(f"{name} must be > 0, got {text}")
    return value


def _sampling_rate(text: str) -> float:
    value = _number(text, "sampling rate")
    if not 0.0 < value <= 1.0:
        raise InvalidInputError(f"sampling rate must be in (0, 1], got {text}")
    return value


def _delta(text: str) -> float:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.accountant.privacy_accountant import check_meaningful_delta

    return check_meaningful_delta(_number(text, "delta"))


def _steps(text: str) -> int:
    value = _number(text, "steps")
    if value != int(value) or value < 1:
        raise InvalidInputError(f"steps must be an integer >= 1, got {text}")
    return int(value)
