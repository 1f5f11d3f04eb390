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

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import DpEvent, Neighbouring, PoissonGaussianEvent, mechanisms, neighbouring_of, to_dp_accounting
from ewtune.accountant.memo import Memo
from ewtune.accountant.privacy_accountant import Kind, PrivacyAccountant, check_delta

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
    """RDP epsilon of ``event`` at ``delta`` (add/remove-one), from a fresh :class:`RdpAccountant`.

    Replace-one is refused: dp_accounting's RDP accountant does not support Poisson sampling under
    replace-one, and we do not substitute an unproven bound for it."""
    return rdp_epsilon_and_order(event, delta)[0]


def rdp_epsilon_and_order(event: DpEvent, delta: float) -> tuple[float, float]:
    """(epsilon, the optimal RDP order): an order at either end of :data:`RDP_ORDERS` would mean the
    grid is too short."""
    return RdpAccountant().epsilon_and_order(event, delta)


def _one_step_rdp(sampling_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP at each of :data:`RDP_ORDERS` of one Poisson-subsampled Gaussian step, from dp_accounting's
    ``RdpAccountant``; its absl warnings are silenced (module docstring)."""
    # dp_accounting: +0.4 s (1.6 s cold); `ewtune accountant epsilon` without RDP never loads it
    from absl import logging as absl_logging
    from dp_accounting.rdp import rdp_privacy_accountant

    dp_event, relation = to_dp_accounting(PoissonGaussianEvent(sampling_rate, noise_multiplier, 1))
    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS), neighboring_relation=relation)
    previous = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        accountant.compose(dp_event)
    finally:
        absl_logging.set_verbosity(previous)
    return accountant.rdp


class RdpAccountant(PrivacyAccountant):
    """RDP with dp_accounting (:func:`rdp_epsilon`): an upper bound, add/remove-one only.

    RDP composes by addition (Mironov 2017, Prop. 1), so an event's RDP is the sum over its mechanisms of
    steps x one step's RDP; the accountant keeps each (q, sigma)'s one-step curve, the expensive part (each
    fractional order is a series), so that a ledger's growing composition costs a sum, not a recomputation."""

    name = "rdp"
    label = "RDP (upper bound, dp_accounting)"
    kind = Kind.BOUND

    def __init__(self) -> None:
        super().__init__()
        self._curves = Memo(maxsize=1024)

    def refusal(self, event: DpEvent) -> str | None:
        return _REFUSAL if neighbouring_of(event) is not Neighbouring.ADD_REMOVE else None

    def epsilon_and_order(self, event: DpEvent, delta: float) -> tuple[float, float]:
        # dp_accounting: +0.4 s (1.6 s cold); `ewtune accountant epsilon` without RDP never loads it
        from dp_accounting.rdp import rdp_privacy_accountant

        check_delta(delta)
        epsilon, order = rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, self._rdp(self._accepted(event)), delta)
        return float(epsilon), float(order)

    def _epsilon(self, event: DpEvent, delta: float) -> float:
        return self.epsilon_and_order(event, delta)[0]

    def _delta(self, event: DpEvent, epsilon: float) -> float:
        # dp_accounting: +0.4 s (1.6 s cold); `ewtune accountant epsilon` without RDP never loads it
        from dp_accounting.rdp import rdp_privacy_accountant

        return float(rdp_privacy_accountant.compute_delta(RDP_ORDERS, self._rdp(event), epsilon)[0])

    def _rdp(self, event: DpEvent) -> np.ndarray:
        total = np.zeros(len(RDP_ORDERS))
        for (rate, sigma, _), steps in mechanisms(event).items():
            total = total + steps * self._curves.get((rate, sigma), lambda: _one_step_rdp(rate, sigma))
        return total
