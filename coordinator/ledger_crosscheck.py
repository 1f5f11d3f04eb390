"""The coordinator-side name of the ledger cross-check; the logic lives in :mod:`accountant.crosscheck`, so
that ``ewtune ledger crosscheck`` (in ``accountant/``, which never imports ``coordinator/``) can use it."""

from accountant.crosscheck import CrossCheck, commits_by_round, cross_check, cross_check_ledgers, read_entries

__all__ = ["CrossCheck", "commits_by_round", "cross_check", "cross_check_ledgers", "read_entries"]
