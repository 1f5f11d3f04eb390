"""The ``ewtune`` command line and the one-machine demo that wires the parts together."""

__version__ = "0.1.0"
