"""The comparisons table: each DWF curve against every other curve of its panel at the report's CRs,
Welch t-test and interval, Holm over the panel. Checked against an independent computation by hand
(numpy, math and scipy.stats.t only) on a small CSV written here, and through ``report``."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from benchmark.__main__ import main
from benchmark.analysis import comparisons as cmp
from benchmark.analysis import curves as cv
from benchmark.analysis import tables as tb
from benchmark.analysis import report

CRS = (10, 30)


def row(method, seed, cr, acc, arch="lenet300", depth=None, status="ok") -> dict:
    return {"grid": "g", "cell_id": f"{method}{depth}-{arch}-{seed}-{cr}", "method": method, "arch": arch,
            "dataset": "mnist", "seed": seed, "depth": depth, "level": "", "test_acc": acc, "cr": cr,
            "cr_effective": cr, "status": status}


#: (method, depth) -> {seed: (accuracy at CR 10, accuracy at CR 100)}, lenet300/mnist
CURVES = {
    ("dwf", 2): {0: (0.968, 0.900), 1: (0.974, 0.910), 2: (0.966, 0.890)},
    ("dwf", 3): {0: (0.970, 0.950), 1: (0.969, 0.945), 2: (0.972, 0.952)},
    ("shallow", 2): {0: (0.990, 0.980), 1: (0.991, 0.979), 2: (0.989, 0.981)},
    ("magnitude", None): {0: (0.50, 0.20), 1: (0.52, 0.21), 2: (0.49, 0.19), 3: (0.51, 0.22)},
    ("snip", None): {0: (0.93, 0.80)},
}
#: lenet5/mnist: its own Holm family
CURVES_LENET5 = {("dwf", 3): {0: (0.97, 0.90), 1: (0.96, 0.91)}, ("magnitude", None): {0: (0.6, 0.3), 1: (0.7, 0.2)}}


def label(method, depth) -> str:
    return f"dwf D={depth}" if method == "dwf" else method


def rows() -> list[dict]:
    out = [row("dense", s, 1, 0.99) for s in range(3)] + [row("dense", 0, 1, 0.99, arch="lenet5")]
    for arch, curves in (("lenet300", CURVES), ("lenet5", CURVES_LENET5)):
        for (method, depth), seeds in curves.items():
            for seed, (a10, a100) in seeds.items():
                out += [row(method, seed, 10, a10, arch, depth), row(method, seed, 100, a100, arch, depth)]
    out.append(row("snip", 1, "", "", status="failed"))  # a failed cell: no point, not a seed of the curve
    return out


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "g").mkdir()
    pd.DataFrame(rows()).to_csv(tmp_path / "g" / "results.csv", index=False)
    return tmp_path


def by_hand(seeds: dict, cr: float) -> np.ndarray:
    """Per-seed accuracy (%) at CR 10 or 30: linear in log10(CR) between the points at 10 and 100."""
    w = math.log10(cr / 10)  # 0 at CR 10, log10(3) at CR 30
    return np.array([100 * (a10 + w * (a100 - a10)) for a10, a100 in seeds.values()])


def welch_by_hand(a: np.ndarray, b: np.ndarray) -> dict:
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = math.sqrt(va + vb)
    diff = a.mean() - b.mean()
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = diff / se
    half = stats.t.ppf(0.975, df) * se
    return {"diff_pts": diff, "t": t, "df": df, "p": 2 * stats.t.sf(abs(t), df), "ci_low_pts": diff - half,
            "ci_high_pts": diff + half}


def holm_by_hand(p: list[float]) -> list[float]:
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - k) * p[i]))
        out[i] = running
    return out


def expected_table() -> pd.DataFrame:
    out = []
    for arch, curves, pairs in (
            ("lenet300", CURVES, [(("dwf", 2), ("dwf", 3)), (("dwf", 2), ("shallow", 2)),
                                  (("dwf", 2), ("magnitude", None)), (("dwf", 2), ("snip", None)),
                                  (("dwf", 3), ("shallow", 2)), (("dwf", 3), ("magnitude", None)),
                                  (("dwf", 3), ("snip", None))]),
            ("lenet5", CURVES_LENET5, [(("dwf", 3), ("magnitude", None))])):
        panel = []
        for cr in CRS:
            for a, b in pairs:
                acc_a, acc_b = by_hand(curves[a], cr), by_hand(curves[b], cr)
                r = {"arch": arch, "cr": float(cr), "a": label(*a), "b": label(*b), "n_a": len(acc_a),
                     "n_b": len(acc_b), "acc_a_pct": acc_a.mean(), "acc_b_pct": acc_b.mean()}
                if len(acc_b) > 1:
                    r.update(welch_by_hand(acc_a, acc_b))
                else:  # one seed of snip: the difference only
                    r.update(diff_pts=acc_a.mean() - acc_b.mean(), t=np.nan, df=np.nan, p=np.nan,
                             ci_low_pts=np.nan, ci_high_pts=np.nan)
                panel.append(r)
        tested = [r for r in panel if not math.isnan(r["p"])]
        for r, adjusted in zip(tested, holm_by_hand([r["p"] for r in tested])):
            r["p_holm"] = adjusted
        for r in panel:
            r.setdefault("p_holm", np.nan)
            r["family_size"] = len(tested)
        out += panel
    return pd.DataFrame(out)


def test_the_table_is_the_welch_test_and_holm_computed_by_hand(folder):
    table = cmp.comparisons_table(cv.load_results(folder / "g" / "results.csv"), CRS)
    expected = expected_table()
    assert len(table) == len(expected) == 2 * 7 + 2 * 1
    assert table[["arch", "cr", "a", "b"]].values.tolist() == expected[["arch", "cr", "a", "b"]].values.tolist()
    for col in ("n_a", "n_b", "family_size"):
        assert table[col].tolist() == expected[col].tolist(), col
    for col in ("acc_a_pct", "acc_b_pct", "diff_pts", "ci_low_pts", "ci_high_pts", "t", "df", "p", "p_holm"):
        np.testing.assert_allclose(table[col].to_numpy(float), expected[col].to_numpy(float), rtol=1e-9,
                                   atol=1e-12, err_msg=col)
    assert set(table.family_size[table.arch == "lenet300"]) == {10}  # 7 pairs x 2 CRs, less the 4 against snip
    assert set(table.family_size[table.arch == "lenet5"]) == {2}


def test_per_seed_accuracy_is_the_accuracy_tables(folder):
    results = cv.load_results(folder / "g" / "results.csv")
    table = cmp.comparisons_table(results, CRS)
    accuracy = tb.accuracy_at_cr_table(results, CRS).set_index(["arch", "variant", "cr"])
    for r in table.itertuples():
        assert r.acc_a_pct == pytest.approx(accuracy.loc[(r.arch, r.a, r.cr), "acc_pct_mean"], abs=1e-12)
        assert r.acc_b_pct == pytest.approx(accuracy.loc[(r.arch, r.b, r.cr), "acc_pct_mean"], abs=1e-12)


def test_a_side_with_one_seed_gets_the_difference_but_no_interval_or_p(folder):
    table = cmp.comparisons_table(cv.load_results(folder / "g" / "results.csv"), CRS)
    snip = table[table.b == "snip"]
    assert len(snip) == 4 and (snip.n_b == 1).all() and snip.diff_pts.notna().all()
    assert snip[["ci_low_pts", "ci_high_pts", "t", "df", "p", "p_holm"]].isna().all().all()
    assert (snip.note == "B has 1 seed: no spread, no interval or p").all()
    assert (snip.verdict == "not resolved with 3/1 seeds").all()
    tested = table[table.b != "snip"]
    assert tested.p.notna().all() and (tested.note == "").all()


def test_a_cr_no_seed_of_a_side_reaches_has_no_difference(folder):
    table = cmp.comparisons_table(cv.load_results(folder / "g" / "results.csv"), (1000,))
    assert (table.n_a == 0).all() and table.diff_pts.isna().all() and table.p.isna().all()
    assert (table.note == "no seed of A reaches this CR").all() and (table.family_size == 0).all()


def test_the_verdict_follows_the_corrected_p_and_the_sign():
    assert cmp.verdict(2.0, 0.049, 3, 3) == "A better"
    assert cmp.verdict(-2.0, 0.049, 3, 3) == "B better"
    assert cmp.verdict(2.0, 0.05, 3, 3) == "not resolved with 3 seeds"
    assert cmp.verdict(2.0, math.nan, 3, 1) == "not resolved with 3/1 seeds"


def test_verdicts_of_the_table(folder):
    table = cmp.comparisons_table(cv.load_results(folder / "g" / "results.csv"), CRS)
    expected = expected_table()
    want = ["A better" if p < 0.05 and d > 0 else "B better" if p < 0.05 else
            f"not resolved with {na} seeds" if na == nb else f"not resolved with {na}/{nb} seeds"
            for p, d, na, nb in zip(expected.p_holm.fillna(1), expected.diff_pts, expected.n_a, expected.n_b)]
    assert table.verdict.tolist() == want
    # the data are made so that every kind of verdict occurs
    at10 = table[(table.arch == "lenet300") & (table.cr == 10)].set_index("b")
    assert at10.loc["magnitude", "verdict"].tolist() == ["A better", "A better"]
    assert at10.loc["shallow", "verdict"].tolist() == ["B better", "B better"]
    assert at10.loc["dwf D=3", "verdict"] == "not resolved with 3 seeds"  # 96.93 against 97.03
    # Holm, not Bonferroni: p = 0.010 is the 3rd smallest of 10, so 3 x 0.010 < 0.05 < 10 x 0.010
    d2_shallow = at10[at10.a == "dwf D=2"].loc["shallow"]
    assert 0.005 < d2_shallow.p < 0.005 * 10 / 3 and d2_shallow.p_holm == pytest.approx(3 * d2_shallow.p)
    assert table[table.arch == "lenet5"].verdict.tolist() == ["not resolved with 2 seeds", "A better"]


def test_the_resolved_note_names_each_winner_with_its_difference_and_interval(folder):
    """The note a reader quotes: every resolved row once, turned to the winner's side (a B-better
    row's interval flipped), nothing unresolved; checked against the by-hand computation."""
    table = cmp.comparisons_table(cv.load_results(folder / "g" / "results.csv"), CRS)
    notes = cmp.resolved_notes(table)
    assert len(notes) == 2 and notes[0].startswith("LeNet-300-100 / MNIST, resolved")
    expected = expected_table()
    resolved = expected[expected.p_holm.fillna(1) < 0.05]
    assert len(resolved) == 10
    for r in resolved.itertuples():
        sign = 1 if r.diff_pts > 0 else -1
        winner, loser = (r.a, r.b) if sign > 0 else (r.b, r.a)
        low, high = sorted((sign * r.ci_low_pts, sign * r.ci_high_pts))
        claim = f"{winner} over {loser} {sign * r.diff_pts:+.2f} [{low:+.2f}, {high:+.2f}]"
        note = notes[0] if r.arch == "lenet300" else notes[1]
        assert note.count(claim) == 1 and f"CR {r.cr:g}: " in note, claim
    assert "shallow over dwf D=2" in notes[0] and "dwf D=3 over magnitude" in notes[0]
    at10, at30 = notes[0].split(" · ")
    assert "dwf D=3 over dwf D=2" not in at10 and "dwf D=3 over dwf D=2" in at30  # 96.93 against 97.03 at CR 10
    assert sum(len(re.findall(r"\[[-+][0-9.]+, [-+][0-9.]+\]", n)) for n in notes) == 10  # and nothing else


def test_pairs_are_each_dwf_curve_against_every_other_and_dwf_pairs_once(folder):
    results = cv.load_results(folder / "g" / "results.csv")
    assert cmp.pairs(results, "lenet300", "mnist") == [
        ("dwf D=2", "dwf D=3"), ("dwf D=2", "shallow"), ("dwf D=2", "magnitude"), ("dwf D=2", "snip"),
        ("dwf D=3", "shallow"), ("dwf D=3", "magnitude"), ("dwf D=3", "snip")]  # dense: a line, not a curve


def test_holm_by_hand_on_known_p_values():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> non-decreasing 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(cmp.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(cmp.holm([0.6, 0.7]), [1.0, 1.0])  # capped at 1
    out = cmp.holm([0.01, math.nan, 0.02])  # NaN is no test: m = 2
    assert math.isnan(out[1]) and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.02)


def test_no_spread_on_either_side_is_no_test():
    test = cmp.welch([10.0, 10.0, 10.0], [10.0, 10.0])
    assert test["diff"] == 0 and math.isnan(test["p"]) and "no spread" in test["note"]


def test_minimum_detectable_difference():
    # large n: the normal approximation (z_0.975 + z_0.8) * s * sqrt(2/n) = 2.8016 * s * sqrt(2/n)
    assert cmp.minimum_detectable_difference(1.0, 2000) == pytest.approx(2.8016 * math.sqrt(2 / 2000), rel=2e-3)
    # n = 3: a t-test with 4 degrees of freedom at that difference has power 0.8
    d = cmp.minimum_detectable_difference(0.5, 3)
    ncp, crit = d / (0.5 * math.sqrt(2 / 3)), stats.t.ppf(0.975, 4)
    assert stats.nct.sf(crit, 4, ncp) + stats.nct.cdf(-crit, 4, ncp) == pytest.approx(0.8)


def test_report_writes_the_comparisons_table_in_three_formats(folder, capsys):
    assert main(["report", "--grid", "g", "--results-dir", str(folder), "--crs", "10,30", "--no-page"]) == 0
    out = capsys.readouterr().out
    assert ("comparisons: 16 (DWF curve vs other curve at a CR), 10 resolved at Holm-corrected p < 0.05 "
            "(5 DWF better, 5 other better)") in out
    tidy = pd.read_csv(folder / "g" / "comparisons.csv")
    assert len(tidy) == 16 and list(tidy.columns) == cmp.COLUMNS
    md = (folder / "g" / "comparisons.md").read_text()
    assert ("| arch | dataset | CR | A | B | seeds | A % | B % | A - B (pts) | 95 % CI | p | p Holm | verdict "
            "| note |") in md
    assert "| LeNet-300-100 | MNIST | 10 | dwf D=3 | magnitude | 3/4 | 97.03 ± 0.15 | 50.50 ± 1.29 | +46.53 |" in md
    assert "Holm over the 10 comparisons with a p" in md and "Holm over the 2 comparisons" in md
    assert "LeNet-300-100 / MNIST, resolved (winner over loser, points, 95 % CI): CR 10: " in md
    tex = (folder / "g" / "comparisons.tex").read_text()
    assert r"\begin{longtable}" in tex and r"\end{longtable}" in tex
    assert r"LeNet-300-100 & MNIST & 10 & dwf D=3 & magnitude & 3/4 & 97.03 $\pm$ 0.15" in tex
    assert r"p Holm $<$ 0.05" in tex and "95 \\% CI" in tex


def test_no_comparisons_at_another_threshold_scale(folder):
    files, _ = report.write_report("g", folder, crs=CRS, threshold_scale=0.01)
    assert not any("comparisons" in f.name for f in files)


def test_the_page_has_the_comparisons_section(folder):
    from benchmark.analysis.page import write_page

    text = write_page("g", folder, crs=CRS).read_text()
    assert '<h2 id="comparisons">DWF against every other curve at CR 10, 30' in text
    assert '<a href="#comparisons">' in text and "Holm over the 10 comparisons with a p" in text
    section = text[text.index('<h2 id="comparisons">'):]
    section = section[:section.index("<h2", 5)]
    assert section.count("<tr") == 1 + 16  # header and every comparison
    assert "<td>A better</td>" in section and "<td>not resolved with 3/1 seeds</td>" in section
