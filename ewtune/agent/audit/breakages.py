"""Engines broken on purpose, for the audit's power tests (noise off, clipping bypassed, every record in every
step, noise 4x or 2x too small, noise std sigma instead of sigma C): each patches one real part of the agent's DP-SGD engine for the duration of a block,
and the audit runs unchanged. Used by the tests and ``ewtune/bench/audit.py`` in one process, and by an audit daemon
whose agent.toml names one in its ``[audit]`` table (only an audit daemon, which trains synthetic records and
whose policy allows audit runs, accepts the key: :mod:`ewtune.agent.audit.holder`).
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import torch

import ewtune.agent.dpsgd.step as step_module
from ewtune.agent.audit.holder_config import BREAKAGE_NAMES, check_breakage
from ewtune.agent.dpsgd.engine import PerExampleClipper
from ewtune.agent.dpsgd.step import DPSGDStep
from ewtune.agent.sampler import PoissonSampler

_add_noise = step_module.add_gaussian_noise_
_weighted_sums = PerExampleClipper._weighted_sums
_step_init = DPSGDStep.__init__


def _no_noise(grads, std, source=None):
    return None


def _noise_divided_by(factor: float):
    """The engine's noise with its standard deviation divided by ``factor``."""

    def scaled(grads, std, source=None):
        _add_noise(grads, std / factor, source)

    return scaled


def _noise_std_sigma_not_sigma_c(self, *args, **kwargs):
    """The engine's step with the mix-up of sigma and sigma C: it computes the noise std from a clip norm of 1
    (std = sigma), while clipping to the real C. Invisible at C = 1; at C = 2 the noise is half what is
    accounted."""
    _step_init(self, *args, **kwargs)
    self.clip_norm = 1.0


def _unclipped(self, uses, instantiated, norms):
    """The engine's own weighted sum with every norm taken as 0, so every clip factor is 1."""
    return _weighted_sums(self, uses, instantiated, torch.zeros_like(norms))


def _every_record(self):
    return (torch.arange(self.num_examples) for _ in range(self.steps))


# name (BREAKAGE_NAMES, importable without torch for the configuration check) -> what it patches
BREAKAGES = dict(zip(BREAKAGE_NAMES, (
    (step_module, "add_gaussian_noise_", _no_noise),  # noise off
    (PerExampleClipper, "_weighted_sums", _unclipped),  # clipping bypassed
    (PoissonSampler, "__iter__", _every_record),  # every record in every step
    (step_module, "add_gaussian_noise_", _noise_divided_by(4.0)),  # noise 4x too small
    (step_module, "add_gaussian_noise_", _noise_divided_by(2.0)),  # noise halved
    (DPSGDStep, "__init__", _noise_std_sigma_not_sigma_c),  # noise std sigma, not sigma C
), strict=True))


@contextmanager
def broken(name: str | None):
    """Within the block, the engine part named by ``name`` (a key of BREAKAGES) is broken; None: intact."""
    check_breakage(name)
    if name is None:
        yield
        return
    target, attribute, replacement = BREAKAGES[name]
    with mock.patch.object(target, attribute, replacement):
        yield
