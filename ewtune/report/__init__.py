"""The auditor's offline report, which ``ewtune ledger report`` draws (ewtune/ledger_cli.py).

- :mod:`ewtune.report.audit_report`: the report as data, from verified ledgers only: each holder's epsilon round
  by round under every accountant, its budget, every entry, the receipts cross-check, the accuracy by round;
- :mod:`ewtune.report.accuracy_records`: reading the accuracy documents ewtune writes (a coordinator's
  status.json, ``ewtune evaluate --json``, ``train-local --json``), one-line errors for anything else;
- :mod:`ewtune.report.report_html`: the PNG plots (matplotlib, imported there only) and the one self-contained
  HTML page.

It imports ``ewtune.accountant`` (the ledger, its verification, the accountants) and never torch, flwr, the agent,
the coordinator nor the benchmarks.
"""
