"""The coordinator-side name of the ledger cross-check; the logic lives in :mod:`accountant.crosscheck`, so
that ``accountant/`` (which never imports ``coordinator/``) can offer it to auditors too."""

from accountant.crosscheck import CrossCheck, commits_by_round, cross_check, read_entries

__all__ = ["CrossCheck", "commits_by_round", "cross_check", "read_entries"]
