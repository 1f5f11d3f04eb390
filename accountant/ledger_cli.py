"""``ewtune ledger verify|show``: audit a privacy ledger offline. Imports only argparse until a command runs."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("ledger", help="verify or show a privacy ledger")
    actions = parser.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)

    verify = actions.add_parser(
        "verify",
        help="check chain, signatures, rules and every epsilon; exit 0 only when all holds",
        description="Verify a ledger: JSON of every line, seq, prev hashes, Ed25519 signatures, times, "
        "reserve/commit/abort rules, and every stated epsilon recomputed from the events. Exit 0 when all "
        "holds, 1 naming the first bad entry, 2 when the file is not a readable ledger.",
    )
    verify.add_argument("path", help="the ledger (JSON Lines)")
    verify.add_argument(
        "--public-key",
        metavar="KEY_OR_FILE",
        help="pin the writer's Ed25519 public key (base64 of 32 raw bytes, or a file holding it or a PEM key); "
        "without it the key in genesis is trusted",
    )
    verify.add_argument("--json", action="store_true", help="print the report as one JSON object")
    verify.set_defaults(func=_verify)

    show = actions.add_parser(
        "show",
        help="per holder: events, certified epsilon, Edgeworth estimate, budget left",
        description="Show each holder's events, its certified epsilon (the guarantee), the Edgeworth "
        "estimate beside it, its budget and what is left, and its open reservations. The ledger is verified "
        "first; exit 1 (after showing what verified) when it does not, 2 when it is not a readable ledger.",
    )
    show.add_argument("path", help="the ledger (JSON Lines)")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=_show)


def _verify(args: argparse.Namespace) -> int:
    import json

    from accountant.verify import verify_ledger

    pinned = None if args.public_key is None else _public_key_argument(args.public_key)
    report = verify_ledger(args.path, pinned)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        print(report.summary())
        for repair in report.repairs:
            print(f"  repair at seq {repair['seq']}: {repair['torn_bytes']} torn bytes cut off, "
                  f"saved as {repair.get('saved_as')}")
    return 0 if report.ok else 1


def _show(args: argparse.Namespace) -> int:
    import json

    from accountant.verify import verify_ledger

    report = verify_ledger(args.path)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        print("\n".join(_show_lines(report)))
    return 0 if report.ok else 1


def _show_lines(report) -> list[str]:
    status = "verified" if report.ok else ("NOT VERIFIED: " + report.summary().split(": ", 1)[1])
    lines = [f"ledger {report.path}: writer {report.writer!r}, {report.entries_verified} entries, {status}"]
    if len(report.holders) > 1:  # a record lives at one holder: parallel composition (DESIGN.md)
        worst = max(report.holders.values(), key=lambda spend: spend.epsilon_certified)
        lines.append(
            f"federation-wide record-level epsilon (max over holders, certified): {worst.epsilon_certified:.6f} "
            f"({worst.holder_id})"
        )
    for holder_id, spend in report.holders.items():
        reservations = [row for row in report.reservations if row["holder"] == holder_id]
        if holder_id == report.writer and len(report.holders) > 1 and not reservations:
            continue  # a coordinator writing for registered holders spends nothing itself
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
    from pathlib import Path

    from accountant.errors import InvalidInputError
    from accountant.signing import SigningKey, load_public_key, public_key_text_from_pem

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
    load_public_key(text)
    return text
