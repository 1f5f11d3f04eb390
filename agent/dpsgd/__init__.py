"""DP-SGD: per-example losses, clipped per-example gradient sums (book-keeping), Gaussian noise, the step."""

from agent.dpsgd.engine import ClippedSum, PerExampleClipper, PerExampleGradientError
from agent.dpsgd.losses import causal_lm_loss, classification_loss
from agent.dpsgd.noise import gaussian_noise_like
from agent.dpsgd.step import DPSGDStep, StepStats

__all__ = [
    "ClippedSum",
    "DPSGDStep",
    "PerExampleClipper",
    "PerExampleGradientError",
    "StepStats",
    "causal_lm_loss",
    "classification_loss",
    "gaussian_noise_like",
]
