"""The familiar baseline: Renyi-DP accounting with Google's dp_accounting ``RdpAccountant``.

RDP of the Poisson-subsampled Gaussian at each order (Mironov, Talwar, Zhang 2019, arXiv 1908.10530),
summed over steps, converted once to (epsilon, delta) with dp_accounting's conversion (Canonne, Kamath,
Steinke 2020, Prop. 12 / Asoodeh et al. 2021), never the "classic" eps = R - log(delta)/(alpha - 1).
A valid upper bound, typically 5-15% above the tight (PLD) epsilon. The order grid extends well past
dp_accounting's default (which stops at 63 and then jumps 128, 256, ...): for small epsilon the optimal
order lies in the hundreds or thousands, and an optimum at the grid edge inflates epsilon
(+23% at q = 0.01, sigma = 10, T = 1000 with a grid ending at 63).

dp_accounting logs through absl a warning per order at which its series for fractional orders fails to
converge (``_compute_log_a_frac``); that order's RDP is then taken as infinite, which only loosens the
bound, so the warnings carry nothing a user can act on and are silenced.
"""

from __future__ import annotations

import numpy as np

from accountant.errors import InvalidInputError
from accountant.events import DpEvent, Neighbouring, neighbouring_of, to_dp_accounting
from accountant.privacy_accountant import Kind, PrivacyAccountant, check_delta

_REFUSAL = (
    "RDP accounting of Poisson sampling under replace-one is not supported (dp_accounting has no sound bound "
    "for it); use the certified accountant"
)

RDP_ORDERS: tuple[float, ...] = tuple(
    [1.0 + x / 20.0 for x in range(1, 20)]  # 1.05 .. 1.95: large epsilon
    + [2.0 + x / 5.0 for x in range(0, 45)]  # 2.0 .. 10.8
    + list(range(11, 65))  # integer orders have a closed form and are cheap
    + list(range(66, 129, 2))
    + sorted({int(round(a)) for a in np.geomspace(136, 4096, 16)})  # small epsilon: optimum in the 100s-1000s
)


def rdp_epsilon(event: DpEvent, delta: float) -> float:
    """RDP epsilon of ``event`` at ``delta`` (add/remove-one).

    Replace-one is refused: dp_accounting's RDP accountant does not support Poisson sampling under
    replace-one, and we do not substitute an unproven bound for it."""
    return rdp_epsilon_and_order(event, delta)[0]


def rdp_epsilon_and_order(event: DpEvent, delta: float) -> tuple[float, float]:
    """(epsilon, the optimal RDP order): an order at either end of :data:`RDP_ORDERS` would mean the
    grid is too short."""
    from dp_accounting.rdp import rdp_privacy_accountant

    check_delta(delta)
    epsilon, order = _dp_accounting_rdp(event).get_epsilon_and_optimal_order(delta)
    return float(epsilon), float(order)


def _dp_accounting_rdp(event: DpEvent):
    """dp_accounting's RdpAccountant with ``event`` composed; its absl warnings are silenced (module
    docstring)."""
    from absl import logging as absl_logging
    from dp_accounting.rdp import rdp_privacy_accountant

    if neighbouring_of(event) is not Neighbouring.ADD_REMOVE:
        raise InvalidInputError(_REFUSAL)
    dp_event, relation = to_dp_accounting(event)
    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS), neighboring_relation=relation)
    previous = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        accountant.compose(dp_event)
    finally:
        absl_logging.set_verbosity(previous)
    return accountant


class RdpAccountant(PrivacyAccountant):
    """RDP with dp_accounting (:func:`rdp_epsilon`): an upper bound, add/remove-one only."""

    name = "rdp"
    label = "RDP (upper bound, dp_accounting)"
    kind = Kind.BOUND

    def refusal(self, event: DpEvent) -> str | None:
        return _REFUSAL if neighbouring_of(event) is not Neighbouring.ADD_REMOVE else None

    def _epsilon(self, event: DpEvent, delta: float) -> float:
        return rdp_epsilon(event, delta)

    def _delta(self, event: DpEvent, epsilon: float) -> float:
        return float(_dp_accounting_rdp(event).get_delta(epsilon))
