"""Every accountant of this package, in the order reports list them: the certified bound (the guarantee)
first, then the Edgeworth estimates of orders 1-3, the rigorous Edgeworth bound and RDP.

Callers iterate over :func:`standard_accountants` rather than naming accountants one by one; each call
returns fresh accountant objects (with empty caches). RDP imports dp_accounting (about a second) and is
left out with ``rdp=False``.
"""

from __future__ import annotations

from ewtune.accountant.certified import CertifiedAccountant
from ewtune.accountant.edgeworth import ORDERS, EdgeworthAccountant, EdgeworthBoundAccountant
from ewtune.accountant.privacy_accountant import PrivacyAccountant
from ewtune.accountant.rdp import RdpAccountant


def standard_accountants(rdp: bool = True) -> list[PrivacyAccountant]:
    accountants: list[PrivacyAccountant] = [CertifiedAccountant()]
    accountants += [EdgeworthAccountant(order) for order in ORDERS]
    accountants.append(EdgeworthBoundAccountant())
    if rdp:
        accountants.append(RdpAccountant())
    return accountants
