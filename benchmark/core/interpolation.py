"""Accuracy between measured compression ratios: one definition for the tables and for tuning.

Curves are interpolated linearly in log(CR) and never extrapolated (``benchmark.analysis.curves``
explains why); the tuning rule (``benchmark.execution.tuning``) scores candidates with the same
function, so a pick and a table read a curve the same way.
"""

from __future__ import annotations

import numpy as np

REL_EPS = 1e-9  # CRs closer than this (relative) count as equal


def interpolate_log_cr(cr, acc, at) -> np.ndarray:
    """Linear interpolation of ``acc`` against log(``cr``) (sorted ascending) at ``at``; NaN outside
    [min cr, max cr]."""
    cr, acc = np.asarray(cr, float), np.asarray(acc, float)
    at = np.atleast_1d(np.asarray(at, float))
    out = np.full(at.shape, np.nan)
    if len(cr) == 0:
        return out
    inside = (at >= cr[0] * (1 - REL_EPS)) & (at <= cr[-1] * (1 + REL_EPS))
    clipped = np.clip(at[inside], cr[0], cr[-1])
    out[inside] = np.interp(np.log(clipped), np.log(cr), acc)
    return out
