"""The familiar baseline: Renyi-DP accounting with Google's dp_accounting ``RdpAccountant``.

RDP of the Poisson-subsampled Gaussian at each order (Mironov, Talwar, Zhang 2019, arXiv 1908.10530),
summed over steps, converted once to (epsilon, delta) with dp_accounting's conversion (Canonne, Kamath,
Steinke 2020, Prop. 12 / Asoodeh et al. 2021), never the "classic" eps = R - log(delta)/(alpha - 1).
A valid upper bound, typically 5-15% above the tight (PLD) epsilon. The order grid extends well past
dp_accounting's default (which stops at 63 and then jumps 128, 256, ...): for small epsilon the optimal
order lies in the hundreds or thousands, and an optimum at the grid edge inflates epsilon (notes (c):
+23% at q = 0.01, sigma = 10, T = 1000 with a grid ending at 63).
"""

from __future__ import annotations

import numpy as np

from accountant.errors import InvalidInputError
from accountant.events import DpEvent, Neighbouring, neighbouring_of, to_dp_accounting

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

    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise InvalidInputError(f"delta must be in (0, 1), got {delta!r}")
    if neighbouring_of(event) is not Neighbouring.ADD_REMOVE:
        raise InvalidInputError(
            "RDP accounting of Poisson sampling under replace-one is not supported (dp_accounting has no "
            "sound bound for it); use the certified accountant"
        )
    dp_event, relation = to_dp_accounting(event)
    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS), neighboring_relation=relation)
    accountant.compose(dp_event)
    epsilon, order = accountant.get_epsilon_and_optimal_order(delta)
    return float(epsilon), float(order)
