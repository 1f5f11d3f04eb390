"""The coordinator-side name of the ledger cross-check; the logic lives in :mod:`ewtune.accountant.crosscheck`, so
that ``ewtune ledger crosscheck`` (in ``ewtune/accountant/``, which never imports ``ewtune/coordinator/``) can use it."""

from ewtune.accountant.crosscheck import CrossCheck, commits_by_round, cross_check, cross_check_ledgers, read_entries

__all__ = ["CrossCheck", "commits_by_round", "cross_check", "cross_check_ledgers", "read_entries"]
