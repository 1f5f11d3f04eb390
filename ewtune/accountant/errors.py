"""Errors that carry a one-line message meant for the user."""


class EwtuneError(Exception):
    """Base class: the CLI prints ``ewtune: error: <message>`` and exits with ``exit_code``."""

    exit_code = 1


class InvalidInputError(EwtuneError, ValueError):
    """A parameter or file given by the user is invalid (bad q, sigma, delta, a malformed ledger...)."""

    exit_code = 2


class UnknownEventKindError(InvalidInputError):
    """A serialised event has a kind or schema version this release does not know; never guessed."""
