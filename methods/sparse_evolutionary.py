"""SET, ``set`` (Mocanu et al. 2018, "Scalable training of artificial neural networks with adaptive
sparse connectivity inspired by network science"), as the RigL paper runs it as a baseline.

Everything is RigL's (``methods.rigl``: sparse from the start, per-layer densities from
``distribution``, every ``interval`` steps until ``end`` drop the fraction ζ_t of each layer's active
weights with the smallest magnitude on the cosine schedule) except growth: the same number of weights
is grown uniformly at random among those inactive after the drop, starting at exactly zero.

Ours / the RigL paper's, not the SET paper's: SET removes a fraction ζ = 0.3 after every epoch, of
the positive and of the negative weights separately (those nearest zero), with no decay; it uses
Erdős–Rényi densities, which for linear layers are what ``erk`` computes (for convolutions ERK
also counts the kernel's dimensions). The random growth is seeded by (cell seed, step), so a
resumed run grows the same weights.
"""

from __future__ import annotations

from benchmark.core.method import Plotting, register
from methods.rigl import DynamicSparse


@register
class SET(DynamicSparse):
    """SET: sparse training, drop smallest |w| and grow at random on RigL's cosine schedule."""

    name = "set"
    plotting = Plotting(order=8, style=(9, 0.4, "v", (0, (3, 1, 1, 1))))
    growth = "random"
