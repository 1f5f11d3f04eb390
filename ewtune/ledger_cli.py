"""``ewtune ledger verify|show|anchor|crosscheck|report``: audit a privacy ledger offline, anchor a moved one,
draw an auditor's HTML report.

Imports only the standard library and ewtune.accountant.errors until a command runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ewtune.accountant.errors import InvalidInputError

WITHHELD = "INVALID LEDGER, figures withheld"


def register(subparsers) -> None:
    parser = subparsers.add_parser("ledger", help="verify, show, anchor or cross-check privacy ledgers")
    actions = parser.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    for add_action in (_add_verify, _add_show, _add_anchor, _add_crosscheck, _add_report):
        add_action(actions)


def _add_verify(actions) -> None:
    verify = actions.add_parser(
        "verify",
        help="check chain, signatures, rules, every epsilon, and the head; exit 0 only when all holds",
        description="Verify a ledger: JSON of every line, seq, prev hashes, Ed25519 signatures, times, "
        "reserve/commit/abort rules, every stated epsilon recomputed from the events, and that it holds the "
        "head kept outside it (a ledger cut at a line boundary or restored from an older copy is otherwise a "
        "valid, shorter ledger). Exit 0 when all holds, 1 naming the first bad entry or the missing head, 2 "
        "when the file is not a readable ledger.",
    )
    _add_verification_arguments(verify)
    verify.add_argument("--json", action="store_true", help="print the report as one JSON object")
    verify.set_defaults(func=_verify)


def _add_show(actions) -> None:
    show = actions.add_parser(
        "show",
        help="per holder: events, certified epsilon, Edgeworth estimate, budget left",
        description="Show each holder's events, its certified epsilon (the guarantee), the Edgeworth "
        "estimate beside it, its budget and what is left, and its open reservations. The ledger is verified "
        "first (as by `ewtune ledger verify`); when it does not verify, no figure is shown: the failure is "
        "printed with '" + WITHHELD + "' and the exit code is 1 (2 when it is not a readable ledger).",
    )
    _add_verification_arguments(show)
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=_show)


def _add_anchor(actions) -> None:
    anchor = actions.add_parser(
        "anchor",
        help="write a head file for a ledger that has none (after moving it): accepts its current state",
        description="Write a signed head file for the ledger as it is now. This ACCEPTS THE LEDGER'S CURRENT "
        "STATE AS THE TRUTH: if the file was rolled back or restored from an older copy, the entries it lost "
        "are forgotten for good. Use it only when you moved a ledger (or upgrade one written before head files) "
        "and are certain it is the latest copy. It never overwrites an existing head file, and it is logged.",
    )
    anchor.add_argument("path", help="the ledger (JSON Lines)")
    anchor.add_argument("--key", required=True, metavar="KEY_FILE", help="the writer's private key (PEM)")
    anchor.add_argument("--head", metavar="PATH", help="the head file to write (default: LEDGER.head)")
    anchor.set_defaults(func=_anchor)


def _add_crosscheck(actions) -> None:
    crosscheck = actions.add_parser(
        "crosscheck",
        help="verify the coordinator's and holders' ledgers and match every coordinator commit",
        description="Verify the coordinator's ledger and each holder's (against the key the coordinator "
        "registered for it), then check that every commit in the coordinator's ledger is in the holder's own "
        "ledger with the same event and receipt: a holder ledger rolled back (even with its head file) lacks "
        "commits the coordinator recorded. Exit 0 when all holds, 1 otherwise, 2 on unreadable input.",
    )
    crosscheck.add_argument("coordinator", help="the coordinator's ledger")
    crosscheck.add_argument("holders", nargs="+", metavar="HOLDER_ID=HOLDER_LEDGER", help="a holder's own ledger")
    crosscheck.add_argument("--public-key", metavar="KEY_OR_FILE", help="pin the coordinator's ledger key")
    crosscheck.add_argument("--json", action="store_true", help="print one JSON object")
    crosscheck.set_defaults(func=_crosscheck)


def _add_report(actions) -> None:
    report = actions.add_parser(
        "report",
        help="an HTML report with PNG plots, readable offline: epsilon per round, budgets, every entry, receipts",
        description="Verify each ledger and write DIR/report.html (self-contained: plots embedded, no script or "
        "file from elsewhere) and the plots as PNG files: per holder, epsilon against rounds under every "
        "accountant (the certified epsilon, the guarantee, solid; the Edgeworth estimates and RDP beside it) "
        "with the budget as a line; budget spent and left; accuracy against rounds (with --accuracy); every "
        "entry; the verification of each ledger and, given a coordinator's ledger with holders' ledgers, the "
        "cross-check of its commits and receipt hashes, exactly as `ewtune ledger crosscheck` computes it (each "
        "holder's ledger pinned to the key the coordinator registered for it). A ledger is 'verified' only against "
        "a pinned key; without one it is 'chain intact, signatures not checked against a pinned key'. Figures of "
        "a ledger that fails are withheld. Exit 0 when everything verifies or is intact, 1 otherwise (the report "
        "is written either way), 2 on unreadable input, or without matplotlib (pip install 'ewtune[report]'; "
        "then nothing is written).",
    )
    report.add_argument("ledgers", nargs="+", metavar="LEDGER", help="ledgers (JSON Lines): a coordinator's, holders'")
    report.add_argument("--public-key", metavar="KEY_OR_FILE",
                        help="pin the coordinator's ledger key (or the key of the only ledger given), as "
                        "`ledger crosscheck --public-key` and `ledger verify --public-key` do")
    report.add_argument("--out", required=True, metavar="DIR", help="directory for report.html and the PNG plots")
    report.add_argument("--accuracy", metavar="JSON",
                        help="accuracy by round: the demo's --json result or a coordinator's status.json; or one figure: "
                             "ewtune evaluate --json")
    report.add_argument("--json", action="store_true", help="print the report's figures as one JSON object")
    report.set_defaults(func=_write_report)


def _add_verification_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="the ledger (JSON Lines)")
    parser.add_argument(
        "--public-key",
        metavar="KEY_OR_FILE",
        help="pin the writer's Ed25519 public key (base64 of 32 raw bytes, or a file holding it or a PEM key); "
        "without it the key in the ledger's own genesis is trusted, and the report says it was not pinned",
    )
    parser.add_argument(
        "--head",
        metavar="PATH",
        help="a head file the ledger must contain (default: LEDGER.head when it exists; keep a copy elsewhere, "
        "where a restore of the ledger cannot reach it)",
    )
    parser.add_argument(
        "--expect-head",
        metavar="SEQ:HASH",
        help="a head kept by the holder or auditor (e.g. from the head file or the coordinator's records): the "
        "ledger must hold entry SEQ with that entry hash",
    )


def _report(args: argparse.Namespace):
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.accountant.ledger_head import Head, default_head_path
    from ewtune.accountant.verify import verify_ledger

    pinned = None if args.public_key is None else _public_key_argument(args.public_key)
    expected = None if args.expect_head is None else Head.parse(args.expect_head)
    head = args.head
    if head is None and Path(default_head_path(args.path)).is_file():
        head = default_head_path(args.path)
    return verify_ledger(args.path, pinned, expect_head=expected, head_path=head)


def _verify(args: argparse.Namespace) -> int:
    report = _report(args)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        print(report.summary())
        for repair in report.repairs:
            print(f"  repair at seq {repair['seq']}: {repair['torn_bytes']} torn bytes cut off, "
                  f"saved as {repair.get('saved_as')}")
        for audit in report.audits if report.ok else ():
            who = f" ({audit['holder']})" if "holder" in audit else ""
            print(f"  audit at seq {audit['seq']}{who}: empirical lower bound {audit['epsilon_lower_bound']:.4f} "
                  f"({audit['confidence']:.0%}, {audit['canaries']} canaries) beside the run's certified epsilon "
                  f"{audit['epsilon_certified_run']:.4f}" + ("  AUDIT ALARM" if audit["exceeds_certified"] else ""))
    return 0 if report.ok else 1


def _show(args: argparse.Namespace) -> int:
    report = _report(args)
    if args.json:
        print(json.dumps(report.to_json(figures=report.ok), indent=2, sort_keys=True))
    elif report.ok:
        print("\n".join(_show_lines(report)))
    else:
        print(report.summary())
        print(WITHHELD)
    return 0 if report.ok else 1


def _anchor(args: argparse.Namespace) -> int:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.accountant.ledger import Ledger
    from ewtune.accountant.ledger_head import default_head_path
    from ewtune.accountant.signing import SigningKey

    head_path = args.head or default_head_path(args.path)
    head = Ledger.anchor(args.path, SigningKey.load(args.key), head_path)
    print(f"ledger {args.path}: head {head} written to {head_path}; the ledger's current state is now the truth")
    return 0


def _crosscheck(args: argparse.Namespace) -> int:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.accountant.crosscheck import cross_check_ledgers

    holders = {}
    for text in args.holders:
        holder_id, separator, path = text.partition("=")
        if not separator or not holder_id or not path:
            raise InvalidInputError(f"a holder ledger is given as HOLDER_ID=PATH, got {text!r}")
        if holder_id in holders:
            raise InvalidInputError(f"holder {holder_id!r} is given twice")
        holders[holder_id] = path
    pinned = None if args.public_key is None else _public_key_argument(args.public_key)
    result = cross_check_ledgers(args.coordinator, holders, pinned)
    if args.json:
        print(json.dumps(result.to_json(), indent=2, sort_keys=True))
        return 0 if result.ok else 1
    for name, report in result.reports.items():
        print(f"{name}: {report.summary()}")
    check = result.check
    print(f"cross-check: {check.matched} coordinator commit(s) matched, {len(check.mismatches)} mismatch(es): "
          + ("OK" if result.ok else "FAILED"))
    for line in _mismatch_lines(check.mismatches, check.not_aggregated):
        print(line)
    return 0 if result.ok else 1


def _mismatch_lines(mismatches: list[str], not_aggregated: list[str]) -> list[str]:
    """The cross-check's findings, one line each, as `ledger crosscheck` and `ledger report` print them."""
    return [f"  mismatch: {m}" for m in mismatches] + [f"  spent by a holder but not aggregated: {m}" for m in not_aggregated]


def _write_report(args: argparse.Namespace) -> int:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.report.audit_report import build_report
    from ewtune.report.report_html import write_report

    pinned = None if args.public_key is None else _public_key_argument(args.public_key)
    report = build_report(args.ledgers, args.accuracy, pinned)
    page = write_report(report, args.out)
    if args.json:
        print(json.dumps({**report.to_json(), "html": str(page)}, indent=2, sort_keys=True))
    else:
        for verification in report.ledgers:
            print(verification.summary())
        receipts = report.receipts
        print("receipts: " + (f"{receipts['matched']} coordinator commit(s) matched, "
                              + ("OK" if receipts["ok"] else "FAILED") if receipts["checked"]
                              else f"not cross-checked ({receipts['why']})"))
        for line in _mismatch_lines(receipts.get("mismatches", []), receipts.get("not_aggregated", [])):
            print(line)
        print(f"overall: {report.verdict}")
        print(f"report: {page}")
    return 0 if report.ok else 1


def _show_lines(report) -> list[str]:
    """The figures of a ledger that verified (the caller withholds them otherwise)."""
    lines = [
        f"ledger {report.path}: writer {report.writer!r}, {report.entries_verified} entries, verified "
        f"({report.key_note})"
    ]
    if len(report.holder_ids) > 1:  # a record lives at one holder: parallel composition
        worst = max((report.holders[h] for h in report.holder_ids), key=lambda spend: spend.epsilon_certified)
        lines.append(
            f"federation-wide record-level epsilon (max over holders, certified): {worst.epsilon_certified:.6f} "
            f"({worst.holder_id})"
        )
    for holder_id in report.holder_ids:  # a coordinator writing for registered holders spends nothing itself
        spend = report.holders[holder_id]
        reservations = [row for row in report.reservations if row["holder"] == holder_id]
        lines += [
            "",
            f"holder {holder_id}",
            f"  budget                                epsilon {spend.budget_epsilon:g} at delta {spend.budget_delta:g}",
            f"  certified epsilon (the guarantee)     {spend.epsilon_certified:.6f}",
            f"  Edgeworth estimate (not a guarantee)  {_estimate(spend.epsilon_edgeworth)}",
            f"  budget left                           epsilon {spend.budget_left_epsilon:.6f}",
            f"  open reservations (counted as spent)  {_seqs(spend.open_reservations)}",
        ]
        rows = [("seq", "run", "round", "status", "q", "sigma", "steps run", "steps reserved")]
        for reservation in reservations:
            rows += _reservation_rows(reservation)
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return lines


def _reservation_rows(reservation) -> list[tuple[str, ...]]:
    """One row per planned mechanism of a reservation, with the steps its commit recorded."""
    executed = {
        (m["sampling_rate"], m["noise_multiplier"]): m["steps"] for m in reservation["executed"] or []
    }
    rows = []
    for planned in reservation["planned"]:
        ran = executed.get((planned["sampling_rate"], planned["noise_multiplier"]), 0)
        rows.append((
            str(reservation["seq"]),
            reservation["run_id"],
            str(reservation["round"]),
            reservation["status"],
            f"{planned['sampling_rate']:g}",
            f"{planned['noise_multiplier']:g}",
            str(ran) if reservation["status"] == "committed" else "-",
            str(planned["steps"]),
        ))
    return rows


def _estimate(value) -> str:
    return "n/a" if value is None else f"{value:.6f}"


def _seqs(open_reservations) -> str:
    return ", ".join(str(seq) for seq in sorted(open_reservations)) or "none"


def _public_key_argument(text: str) -> str:
    """A pinned key given inline (base64) or as a file holding base64 text, a PEM public key, or the PEM
    private key itself."""
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.accountant.signing import SigningKey, is_base64, load_public_key, public_key_text_from_pem

    path = Path(text)
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as error:
            raise InvalidInputError(f"cannot read public key file {path}: {error.strerror or error}") from None
        if b"PRIVATE KEY-----" in data:
            return SigningKey.load(path).public_key_text
        if data.lstrip().startswith(b"-----BEGIN"):
            return public_key_text_from_pem(data)
        try:
            text = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise InvalidInputError(f"{path} holds neither a base64 nor a PEM public key") from None
    elif path.exists():
        raise InvalidInputError(f"public key {path} is not a regular file")
    elif not is_base64(text):  # most likely a mistyped path: say so rather than blame the base64
        raise InvalidInputError(f"public key {text}: no such file, and not base64 key text either")
    load_public_key(text)
    return text
