"""The FFT composition's circular convolution with a rigorous bound on its round-off, cell by cell.

Step 5 of the argument of :mod:`ewtune.accountant.pld_engine` (which untilts the cells and answers the queries):

5. *Round-off, bounded cell by cell.* The FFT runs on the PMFs tilted by e^{theta loss} and normalised
   (Wilson & Keich's exponential shift: the cells where delta(eps) is decided are then not far below the
   largest, so absolute round-off is small against them), on a circle of N = 2^k cells. Every computed
   cell gets a rigorous bound B on its absolute error (in tilted units): the forward FFT's per-entry error
   is at most g(N) sqrt(N) ||x||_2 (Higham 2002, "Accuracy and stability of numerical algorithms",
   Thm 24.2, normwise, radix 2, twiddle error taken as 8u) plus the input's rounding; raising to the T-th
   power propagates it by |prod a^T - prod b^T| <= sum_i T_i |a_i - b_i| r_i^{T_i-1} prod_{k!=i} r_k^{T_k}
   (r the larger modulus) and adds the error of evaluating exp(T log b); the inverse FFT moves a cell by at
   most (1/N) times the l1 norm of the spectrum's error, plus its own g(N) ||z||_2.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft

from ewtune.accountant.pld_grid import UNIT_ROUNDOFF


def _fft_error_factor(size: int) -> float:
    """g(N) = log2(N) eta / (1 - log2(N) eta), eta = mu + gamma_4 (sqrt 2 + mu): Higham 2002, Thm 24.2, the
    normwise relative error of a radix-2 FFT; mu, the error of the twiddle factors, is taken as 8 u
    (pocketfft computes them to about one ulp)."""
    twiddle = 8 * UNIT_ROUNDOFF
    gamma_4 = 4 * UNIT_ROUNDOFF / (1 - 4 * UNIT_ROUNDOFF)
    eta = twiddle + gamma_4 * (math.sqrt(2) + twiddle)
    levels = math.log2(size)
    return levels * eta / (1 - levels * eta)


def circular_power(pmfs: list[tuple[np.ndarray, int]], size: int) -> tuple[np.ndarray, float]:
    """The circular convolution of ``steps`` copies of each probability vector, by FFT, and a bound on the
    absolute error of every computed cell (module docstring, step 5). Complex logarithms and exponentials
    are evaluated only at the frequencies whose powered modulus is representable (above e^-745): a long
    composition's spectrum is negligible beyond its lowest frequencies, and elsewhere the composed entry is
    set to 0 with its true modulus, at most e^-745 there, counted as its error."""
    g = _fft_error_factor(size)
    spectra, log_moduli, log_radii, entry_errors = [], [], [], []
    for probs, steps in pmfs:
        wrapped = _wrap(probs, size)
        spectrum = fft.rfft(wrapped)
        # Per-entry error of the spectrum: the normwise bound g ||F x||_2 = g sqrt(N) ||x||_2, plus the
        # rounding of the tilted input and of its wrapping (at most 4 u in l1, hence in every entry).
        entry_error = 1.01 * g * math.sqrt(size) * _l2_norm(wrapped) + 4 * UNIT_ROUNDOFF
        modulus = np.abs(spectrum)
        with np.errstate(divide="ignore"):
            log_moduli.append(np.log(modulus))
        log_radii.append(np.log(np.minimum(modulus + entry_error, 1.0 + entry_error)))
        spectra.append((spectrum, steps))
        entry_errors.append((entry_error, steps))
    log_modulus = sum(steps * log_mod for log_mod, (_, steps) in zip(log_moduli, spectra))
    alive = np.nonzero(log_modulus > -745.0)[0]
    composed, evaluated = _powered_alive(spectra, alive, log_modulus)
    # Powering: |prod a^T - prod b^T| <= sum_i T_i |a_i - b_i| r_i^{T_i - 1} prod_{k != i} r_k^{T_k},
    # r the larger of the true and computed moduli (at most |b| + error, and the true one at most 1).
    log_all = sum(steps * log_radius for log_radius, (_, steps) in zip(log_radii, spectra))
    propagated = sum(
        np.exp(math.log(steps * error) + log_all - log_radius)
        for log_radius, (error, steps) in zip(log_radii, entry_errors)
    )
    spectrum_error = propagated + evaluated
    circle = fft.irfft(composed, size)
    # The inverse DFT of the spectrum's errors: each cell moves by at most (1/N) sum over all N frequencies
    # (the rfft half counted twice); its own rounding is g ||z||_2 with ||z||_2 <= (||computed||_2 + that) / (1 - g).
    full_l1 = 2 * float(np.sum(spectrum_error))
    full_l2 = math.sqrt(2 * float(np.sum(spectrum_error**2)))
    own = g / (1 - g) * (_l2_norm(circle) + full_l2 / math.sqrt(size))
    return circle, full_l1 / size + own


def _powered_alive(spectra: list[tuple[np.ndarray, int]], alive: np.ndarray, log_modulus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """prod b^T = exp(sum T log b) at the ``alive`` frequencies (0 elsewhere), and a bound on the error of
    evaluating it at every frequency: elsewhere the product's modulus itself, exp(log_modulus)."""
    log_spectra = [(np.log(spectrum[alive]), steps) for spectrum, steps in spectra]
    composed = np.zeros(log_modulus.size, dtype=complex)
    composed[alive] = np.exp(sum(steps * log_spectrum for log_spectrum, steps in log_spectra))
    evaluated = np.exp(log_modulus)
    # Evaluating exp(sum T log b): log b to within 2u|log b| + 8u absolute, each sum term's rounding, exp's.
    drift = sum(steps * (2 * UNIT_ROUNDOFF * np.abs(log_spectrum) + 8 * UNIT_ROUNDOFF) for log_spectrum, steps in log_spectra)
    evaluated[alive] = np.abs(composed[alive]) * (np.expm1(np.minimum(drift, 700.0)) + 4 * UNIT_ROUNDOFF)
    return composed, evaluated


def _l2_norm(values: np.ndarray) -> float:
    """||values||_2 rounded up by 1%, far more than its own rounding (np.sum, not BLAS: no thread start-up)."""
    return 1.01 * math.sqrt(float(np.sum(np.square(values))))


def _wrap(probs: np.ndarray, size: int) -> np.ndarray:
    rows = -(-probs.size // size)
    padded = np.zeros(rows * size)
    padded[: probs.size] = probs
    return padded.reshape(rows, size).sum(axis=0)
