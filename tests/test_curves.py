"""Curves from the results CSV: interpolation on log CR, tolerance CRs, seeds, validation, notes.

Every expected number is worked out by hand in the test; log means log10 (the ratio of two logs
does not depend on the base)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from benchmark.analysis import curves as cv
from benchmark.analysis import tables as tb

COLUMNS = ["grid", "cell_id", "method", "family", "variant", "arch", "dataset", "seed", "depth", "lam", "target_cr",
           "level", "test_acc", "cr", "cr_total", "cr_effective", "speedup", "sparsity", "epochs", "wall_s", "device",
           "status"]


def result_row(method, seed, cr, acc, arch="lenet300", dataset="mnist", depth=None, status="ok", **extra) -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row.update(grid="quick", cell_id=f"{method}-{depth}-{arch}-{dataset}-{seed}-{cr}", method=method, arch=arch,
               dataset=dataset, seed=seed, depth="" if depth is None else depth, test_acc=acc, cr=cr,
               cr_effective=cr, status=status, variant=cv.derive_variant(method, {"depth": depth}))
    row.update(extra)
    return row


def write_csv(path, rows, drop=()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).drop(columns=list(drop)).to_csv(path, index=False)


# -- interpolation --------------------------------------------------------------------------------


def test_interpolation_is_linear_in_log_cr_and_never_extrapolates():
    # between (10, 0.9) and (100, 0.7): CR sqrt(10*100)=31.62 is halfway in log -> 0.8
    # CR 20 is log(20/10)/log(100/10) = 0.30103 of the way -> 0.9 - 0.2*0.30103 = 0.839794
    got = cv.interpolate_log_cr([10, 100], [0.9, 0.7], [10, math.sqrt(1000), 20, 100, 5, 101])
    assert got[0] == pytest.approx(0.9)
    assert got[1] == pytest.approx(0.8)
    assert got[2] == pytest.approx(0.839794, abs=1e-6)
    assert got[3] == pytest.approx(0.7)
    assert np.isnan(got[4]) and np.isnan(got[5])  # outside the measured range


def test_curve_merges_equal_crs_and_drops_infinite_cr():
    curve = cv.Curve.from_points(0, [100, 10, 10, math.inf], [0.7, 0.8, 0.9, 0.1])
    assert list(curve.cr) == [10, 100]
    assert curve.acc == pytest.approx([0.85, 0.7])  # (0.8 + 0.9) / 2 at CR 10
    assert curve.covers(10) and curve.covers(100) and not curve.covers(1000)


# -- largest CR within k points -------------------------------------------------------------------

CR = [10, 100, 1000]
ACC = [0.975, 0.95, 0.80]
DENSE = 0.98


@pytest.mark.parametrize("points, expected, lower_bound", [
    # threshold 0.97: 10 (0.975) qualifies, 100 (0.95) not; crossing at (0.97-0.975)/(0.95-0.975) = 0.2
    # of the decade 10..100 -> 10**1.2
    (1, 10 ** 1.2, False),
    # threshold 0.93: 100 qualifies, 1000 (0.80) not; (0.93-0.95)/(0.80-0.95) = 2/15 -> 10**(2 + 2/15)
    (5, 10 ** (2 + 2 / 15), False),
    # threshold 0.88: (0.88-0.95)/(0.80-0.95) = 7/15 -> 10**(2 + 7/15)
    (10, 10 ** (2 + 7 / 15), False),
    # threshold 0.78: the last point (0.80) still qualifies -> its CR, only a lower bound
    (20, 1000, True),
])
def test_largest_cr_within_matches_hand_computation(points, expected, lower_bound):
    cr, bound = cv.largest_cr_within(CR, ACC, DENSE, points)
    assert cr == pytest.approx(expected, rel=1e-9)
    assert bound is lower_bound


def test_largest_cr_walks_from_the_dense_point_when_the_first_point_already_fails():
    # dense (1, 0.98), then (10, 0.5); threshold 0.97 is crossed 0.01/0.48 = 1/48 of the way
    cr, bound = cv.largest_cr_within([10], [0.5], 0.98, 1)
    assert cr == pytest.approx(10 ** (1 / 48))
    assert bound is False


def test_largest_cr_takes_the_largest_qualifying_cr_of_a_non_monotone_curve():
    # dips to 0.90 at CR 10 then recovers to 0.97 (== threshold 0.97) at 100, 0.96 at 1000
    cr, bound = cv.largest_cr_within([10, 100, 1000], [0.90, 0.97, 0.96], 0.98, 1)
    assert cr == pytest.approx(100)
    assert bound is False


def test_a_measured_point_at_cr_1_is_replaced_by_the_dense_point():
    # the measured (1, 0.5) would fail at once; the walk uses (1, 0.98) instead, then (10, 0.975)
    cr, bound = cv.largest_cr_within([1, 10], [0.5, 0.975], 0.98, 1)
    assert cr == pytest.approx(10) and bound is True


# -- mean curve over seeds ------------------------------------------------------------------------


def test_mean_curve_averages_seeds_only_where_all_cover_the_cr():
    seed0 = cv.Curve.from_points(0, [10, 100], [0.9, 0.7])
    seed1 = cv.Curve.from_points(1, [20, 200], [0.8, 0.6])
    mean = cv.mean_curve([seed0, seed1]).set_index("cr")
    # CR 20: seed0 at 0.9 - 0.2*log(2) = 0.839794, seed1 0.8 -> mean 0.819897, std 0.039794/sqrt(2)
    assert mean.loc[20, "mean"] == pytest.approx((0.9 - 0.2 * math.log10(2) + 0.8) / 2)
    assert mean.loc[20, "std"] == pytest.approx((0.1 - 0.2 * math.log10(2)) / math.sqrt(2))
    # CR 100: seed0 0.7, seed1 0.8 - 0.2*log(5) = 0.660206
    assert mean.loc[100, "mean"] == pytest.approx((0.7 + 0.8 - 0.2 * math.log10(5)) / 2)
    assert mean.loc[10, "n"] == 1 and mean.loc[200, "n"] == 1
    drawn = mean.index[mean.drawn]
    assert drawn.min() == pytest.approx(20) and drawn.max() == pytest.approx(100)


# -- reading the CSV ------------------------------------------------------------------------------


def test_missing_file_names_it_and_the_collect_command(tmp_path):
    path = tmp_path / "results" / "quick" / "results.csv"
    with pytest.raises(FileNotFoundError, match=r"results\.csv.*python -m benchmark collect --grid quick"):
        cv.load_results(path)


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "quick" / "results.csv"
    path.parent.mkdir()
    path.write_text("")
    with pytest.raises(ValueError, match=r"results\.csv is empty.*collect --grid quick"):
        cv.load_results(path)


def test_header_without_rows_is_a_clear_error(tmp_path):
    path = tmp_path / "quick" / "results.csv"
    path.parent.mkdir()
    path.write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(ValueError, match="no rows"):
        cv.load_results(path)


def test_missing_required_column_is_named(tmp_path):
    path = tmp_path / "quick" / "results.csv"
    write_csv(path, [result_row("dense", 0, 1.0, 0.98)], drop=["test_acc"])
    with pytest.raises(ValueError, match=r"lacks required column\(s\) test_acc.*collect --grid quick"):
        cv.load_results(path)


def test_accuracy_in_percent_is_rejected(tmp_path):
    path = tmp_path / "quick" / "results.csv"
    write_csv(path, [result_row("dense", 0, 1.0, 98.0)])
    with pytest.raises(ValueError, match="fraction"):
        cv.load_results(path)


def test_variant_is_derived_when_the_column_is_missing(tmp_path):
    path = tmp_path / "quick" / "results.csv"
    write_csv(path, [result_row("dwf", 0, 10, 0.9, depth=3), result_row("magnitude", 0, 10, 0.9),
                     result_row("dense", 0, 1, 0.98)], drop=["variant"])
    results = cv.load_results(path)
    assert set(results.rows.variant) == {"dwf D=3", "magnitude", "dense"}
    assert results.variants() == ["dwf D=3", "magnitude"]  # DWF first, dense is no curve


def test_infinite_and_failed_rows_are_left_out_and_noted(tmp_path):
    path = tmp_path / "quick" / "results.csv"
    rows = [result_row("dense", 0, 1.0, 0.98), result_row("magnitude", 0, 10, 0.9),
            result_row("magnitude", 0, "inf", 0.1), result_row("snip", 0, "", "", status="failed")]
    write_csv(path, rows)
    results = cv.load_results(path)
    assert list(results.seed_curves("lenet300", "mnist", "magnitude")[0].cr) == [10]
    notes = "\n".join(results.notes())
    assert "1 row(s) not ok" in notes and "snip lenet300/mnist seed 0 [failed]" in notes
    assert "infinite CR" in notes and "magnitude: 1" in notes
    assert "lenet300/mnist: no ok results for snip" in notes


def test_notes_list_missing_methods_seeds_and_dense(tmp_path):
    path = tmp_path / "quick" / "results.csv"
    rows = [result_row("dense", 0, 1, 0.98), result_row("dense", 1, 1, 0.97),
            result_row("magnitude", 0, 10, 0.9), result_row("magnitude", 1, 10, 0.9),
            result_row("snip", 0, 10, 0.9),  # seed 1 missing
            result_row("magnitude", 0, 10, 0.8, arch="lenet5")]  # no dense, no snip on lenet5
    write_csv(path, rows)
    notes = cv.load_results(path).notes()
    assert "lenet300/mnist snip: seed(s) 1 missing" in notes
    assert "lenet5/mnist: no dense run, so no dense line and no tolerance numbers" in notes
    assert "lenet5/mnist: no ok results for snip" in notes
    assert not any("magnitude: seed" in n for n in notes)


def test_full_grid_has_no_notes(tmp_path):
    path = tmp_path / "quick" / "results.csv"
    write_csv(path, [result_row("dense", s, 1, 0.98) for s in (0, 1)] +
              [result_row("magnitude", s, 10, 0.9) for s in (0, 1)])
    assert cv.load_results(path).notes() == []


# -- tables ---------------------------------------------------------------------------------------


def two_seed_rows() -> list[dict]:
    """dense 0.98 (seed 0) and 0.96 (seed 1); dwf D=3 seed 0 = the CR/ACC curve above, seed 1 lower."""
    return [result_row("dense", 0, 1, 0.98), result_row("dense", 1, 1, 0.96)] + \
        [result_row("dwf", 0, c, a, depth=3) for c, a in zip(CR, ACC)] + \
        [result_row("dwf", 1, c, a, depth=3) for c, a in zip(CR, [0.955, 0.92, 0.78])]


def test_tolerance_uses_each_seeds_own_dense_accuracy(tmp_path):
    path = tmp_path / "quick" / "results.csv"
    write_csv(path, two_seed_rows())
    table = tb.tolerance_table(cv.load_results(path)).set_index("points")
    # k=5: seed 0 threshold 0.93 -> 10**(2 + 2/15) (as above); seed 1 threshold 0.96-0.05 = 0.91:
    # 100 (0.92) qualifies, 1000 (0.78) not; (0.91-0.92)/(0.78-0.92) = 1/14 -> 10**(2 + 1/14)
    a, b = 10 ** (2 + 2 / 15), 10 ** (2 + 1 / 14)
    assert table.loc[5, "cr_mean"] == pytest.approx((a + b) / 2)
    assert table.loc[5, "cr_std"] == pytest.approx(abs(a - b) / math.sqrt(2))  # sample std of two values
    assert table.loc[5, "n_seeds"] == 2 and not table.loc[5, "lower_bound"]
    # k=10: seed 1 threshold 0.86: (0.86-0.92)/(0.78-0.92) = 3/7 -> 10**(2 + 3/7)
    assert table.loc[10, "cr_mean"] == pytest.approx((10 ** (2 + 7 / 15) + 10 ** (2 + 3 / 7)) / 2)
    assert table.loc[5, "dense_acc_pct"] == pytest.approx(97.0)


def test_seed_without_dense_uses_the_mean_dense(tmp_path):
    path = tmp_path / "quick" / "results.csv"
    rows = [result_row("dense", 0, 1, 0.98), result_row("dense", 1, 1, 0.96)] + \
        [result_row("magnitude", 2, c, a) for c, a in zip(CR, ACC)]
    write_csv(path, rows)
    table = tb.tolerance_table(cv.load_results(path)).set_index("points")
    # mean dense 0.97, k=1 -> threshold 0.96: (0.96-0.975)/(0.95-0.975) = 0.6 -> 10**1.6
    assert table.loc[1, "cr_mean"] == pytest.approx(10 ** 1.6)
    assert table.loc[1, "n_seeds"] == 1 and table.loc[1, "cr_std"] == 0


def test_accuracy_at_fixed_crs_interpolates_and_leaves_out_of_range_blank(tmp_path):
    path = tmp_path / "quick" / "results.csv"
    rows = two_seed_rows()
    rows[-1].update(cr="inf", test_acc=0.1)  # seed 1 stops at CR 100: its strongest lambda pruned everything
    write_csv(path, rows)
    table = tb.accuracy_at_cr_table(cv.load_results(path), crs=(10, math.sqrt(1000), 1000, 5000))
    table = table.set_index("cr")
    # CR 10: 97.5 and 95.5 -> 96.5 ± 1.414
    assert table.loc[10, "acc_pct_mean"] == pytest.approx(96.5)
    assert table.loc[10, "acc_pct_std"] == pytest.approx(2 / math.sqrt(2))
    # CR 31.6 (halfway in log between 10 and 100): (97.5+95)/2 = 96.25 and (95.5+92)/2 = 93.75 -> 95.0
    assert table.loc[math.sqrt(1000), "acc_pct_mean"] == pytest.approx(95.0)
    # CR 1000: only seed 0 reaches it
    assert table.loc[1000, "acc_pct_mean"] == pytest.approx(80.0)
    assert table.loc[1000, "n_seeds"] == 1 and table.loc[1000, "seeds_total"] == 2
    # CR 5000: nobody -> blank, never extrapolated
    assert table.loc[5000, "n_seeds"] == 0 and np.isnan(table.loc[5000, "acc_pct_mean"])


def test_a_seed_whose_sweep_is_still_running_is_left_out_and_noted(tmp_path):
    """Seed 1 has run 1 of the 3 cells seed 0 ran (its low-CR end only): averaged in, it would pull
    the mean at CR 10 toward its own value and make the tolerance answer a mean of two different
    questions. A failed cell counts as run, so seed 2 (one cell diverged) stays in."""
    path = tmp_path / "quick" / "results.csv"
    rows = [result_row("dense", s, 1, 0.98) for s in (0, 1, 2)]
    rows += [result_row("dwf", 0, cr, acc, depth=3) for cr, acc in ((2, 0.97), (10, 0.95), (100, 0.90))]
    rows += [result_row("dwf", 1, 2, 0.96, depth=3)]
    rows += [result_row("dwf", 2, cr, acc, depth=3) for cr, acc in ((2, 0.97), (10, 0.93))]
    rows += [result_row("dwf", 2, "", "", depth=3, status="failed", cell_id="dwf-diverged")]
    write_csv(path, rows)
    results = cv.load_results(path)
    assert [c.seed for c in results.seed_curves("lenet300", "mnist", "dwf D=3")] == [0, 2]
    assert results.partial_seeds("lenet300", "mnist", "dwf D=3") == {1: (1, 3)}
    assert "lenet300/mnist dwf D=3: seed 1 left out of curves and tables, 1 of its 3 cells run so far" in results.notes()
    table = tb.accuracy_at_cr_table(results, crs=(10.0,))
    assert table.n_seeds.tolist() == [2] and table.acc_pct_mean.tolist() == pytest.approx([94.0])
