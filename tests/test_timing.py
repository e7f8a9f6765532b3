"""The one timing rule that ``perf`` and the packing calibration share (``benchmark.engine.timing``)."""

from __future__ import annotations

import time

import torch

from benchmark.engine.timing import interleave, paired_ratio


def test_contenders_alternate_who_goes_first_and_each_is_timed_once_per_round():
    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    seconds = interleave(contenders, rounds=4, device=torch.device("cpu"))
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert {name: len(s) for name, s in seconds.items()} == {"a": 4, "b": 4, "c": 4}


def test_a_slow_contender_measures_slower():
    seconds = interleave({"fast": lambda: None, "slow": lambda: time.sleep(0.01)}, 3, torch.device("cpu"))
    assert min(seconds["slow"]) >= 0.01 > max(seconds["fast"])


def test_the_ratio_is_the_median_of_per_round_ratios_so_a_slow_phase_divides_out():
    # round 2 ran while the machine was three times slower for both contenders
    assert paired_ratio([2.0, 6.0, 2.0], [1.0, 3.0, 1.0]) == 2.0
    assert paired_ratio([1.0, 4.0, 3.0], [1.0, 1.0, 1.0]) == 3.0
