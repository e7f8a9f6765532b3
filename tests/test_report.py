"""Tolerance and accuracy-at-CR tables: numbers, Markdown/LaTeX rows, partial and broken CSVs, CLI."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest

from benchmark.analysis import curves as cv
from benchmark.analysis import report
from benchmark.__main__ import main


def result_row(method, seed, cr, acc, arch="lenet300", dataset="mnist", depth=None, status="ok") -> dict:
    return {"grid": "g", "cell_id": f"{method}{depth}-{arch}-{dataset}-{seed}-{cr}", "method": method,
            "arch": arch, "dataset": dataset, "seed": seed, "depth": depth, "level": "", "test_acc": acc,
            "cr": cr, "cr_effective": cr, "status": status}


def hand_rows() -> list[dict]:
    """lenet300/mnist: dense 0.98/0.96 (seeds 0/1); dwf D=3 on both seeds; magnitude on seed 0 only,
    still within 10 points at its last CR; snip failed. lenet5/mnist: dense and dwf D=3, one seed."""
    rows = [result_row("dense", 0, 1, 0.98), result_row("dense", 1, 1, 0.96)]
    rows += [result_row("dwf", 0, c, a, depth=3) for c, a in [(10, 0.975), (100, 0.95), (1000, 0.80)]]
    rows += [result_row("dwf", 1, c, a, depth=3) for c, a in [(10, 0.955), (100, 0.92), (1000, 0.78)]]
    rows += [result_row("magnitude", 0, c, a) for c, a in [(10, 0.97), (100, 0.90)]]
    rows += [result_row("snip", 0, "", "", status="failed")]
    rows += [result_row("dense", 0, 1, 0.99, arch="lenet5"), result_row("dwf", 0, 10, 0.99, arch="lenet5", depth=3),
             result_row("dwf", 0, 100, 0.89, arch="lenet5", depth=3)]
    return rows


@pytest.fixture
def results_dir(tmp_path):
    folder = tmp_path / "results" / "g"
    folder.mkdir(parents=True)
    pd.DataFrame(hand_rows()).to_csv(folder / "results.csv", index=False)
    return tmp_path / "results"


def md_rows(text: str) -> list[list[str]]:
    """Data rows of the first Markdown table in ``text`` as lists of cells."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def test_report_writes_three_formats_of_both_tables(results_dir):
    files, markdown = report.write_report("g", results_dir)
    assert sorted(p.name for p in files) == sorted([f"{stem}.{fmt}" for stem in ("tolerance", "accuracy_at_cr",
                                                                                 "comparisons")
                                                    for fmt in ("md", "tex", "csv")]
                                                   + [f"{stem}.{fmt}" for stem in ("cost", "settling")
                                                      for fmt in ("md", "csv")])
    assert markdown.startswith("## Largest CR within 1, 5, 10 points of dense (g grid)")
    assert "## Accuracy at CR 10, 100, 1000 (g grid)" in markdown


def test_tolerance_csv_matches_hand_computation(results_dir):
    report.write_report("g", results_dir)
    table = pd.read_csv(results_dir / "g" / "tolerance.csv")
    dwf = table[(table.arch == "lenet300") & (table.variant == "dwf D=3")].set_index("points")
    # k=5, seed 0: dense 0.98 -> threshold 0.93, between (100, 0.95) and (1000, 0.80):
    #   (0.93-0.95)/(0.80-0.95) = 2/15 of the decade -> 10**(2+2/15) = 135.94
    # seed 1: dense 0.96 -> 0.91, between (100, 0.92) and (1000, 0.78): 1/14 -> 10**(2+1/14) = 117.88
    a, b = 10 ** (2 + 2 / 15), 10 ** (2 + 1 / 14)
    assert dwf.loc[5, "cr_mean"] == pytest.approx((a + b) / 2)
    assert dwf.loc[5, "cr_std"] == pytest.approx(abs(a - b) / math.sqrt(2))
    # k=1, seed 0: threshold 0.97 between (10, 0.975) and (100, 0.95): 0.2 -> 10**1.2 = 15.85
    # seed 1: 0.95 between (10, 0.955) and (100, 0.92): 0.005/0.035 = 1/7 -> 10**(1+1/7) = 13.89
    assert dwf.loc[1, "cr_mean"] == pytest.approx((10 ** 1.2 + 10 ** (1 + 1 / 7)) / 2)
    magnitude = table[table.variant == "magnitude"].set_index("points")
    # seed 0 only: k=10 -> threshold 0.88 and the last point (100, 0.90) still qualifies: lower bound 100
    assert magnitude.loc[10, "cr_mean"] == pytest.approx(100) and bool(magnitude.loc[10, "lower_bound"])
    assert magnitude.loc[10, "n_seeds"] == 1
    lenet5 = table[table.arch == "lenet5"].set_index("points")
    # dense 0.99, k=10 -> 0.89 == the point at CR 100, which therefore qualifies (>=): lower bound 100
    assert lenet5.loc[10, "cr_mean"] == pytest.approx(100) and bool(lenet5.loc[10, "lower_bound"])


def test_tolerance_markdown_has_one_row_per_panel_and_variant(results_dir):
    report.write_report("g", results_dir)
    text = (results_dir / "g" / "tolerance.md").read_text()
    header = next(ln for ln in text.splitlines() if ln.startswith("| arch"))
    assert header == "| arch | dataset | method | seeds | ≤ 1 pt | ≤ 5 pts | ≤ 10 pts |"
    rows = md_rows(text)
    assert [r[:3] for r in rows] == [["LeNet-300-100", "MNIST", "dwf D=3"], ["LeNet-300-100", "MNIST", "magnitude"],
                                     ["LeNet-5", "MNIST", "dwf D=3"]]
    a, b = 10 ** (2 + 2 / 15), 10 ** (2 + 1 / 14)
    assert rows[0][5] == f"{(a + b) / 2:.0f} ± {abs(a - b) / math.sqrt(2):.0f}"  # '127 ± 13'
    assert rows[1][6] == "≥ 100"  # lower bound, one seed: no std
    assert "Dense accuracy (mean ± std over seeds): LeNet-300-100 / MNIST: 97.00 ± 1.41 % (2 seeds)" in text


def test_partial_grid_is_noted_in_the_tables(results_dir):
    _, markdown = report.write_report("g", results_dir)
    assert "- 1 row(s) not ok, ignored (failed: 1): snip lenet300/mnist seed 0 [failed]" in markdown
    assert "- lenet300/mnist magnitude: seed(s) 1 missing" in markdown
    assert "- lenet5/mnist: no ok results for magnitude, snip" in markdown


def test_accuracy_table_interpolates_and_leaves_out_of_range_blank(results_dir):
    report.write_report("g", results_dir)
    rows = md_rows((results_dir / "g" / "accuracy_at_cr.md").read_text())
    by_method = {(r[0], r[2]): r for r in rows}
    dwf = by_method[("LeNet-300-100", "dwf D=3")]
    # CR 10: 97.5 and 95.5 -> 96.50 ± 1.41; CR 1000: 80 and 78 -> 79.00 ± 1.41
    assert dwf[4:] == ["96.50 ± 1.41", "93.50 ± 2.12", "79.00 ± 1.41"]
    assert by_method[("LeNet-300-100", "magnitude")][4:] == ["97.00", "90.00", report.MISSING]
    tidy = pd.read_csv(results_dir / "g" / "accuracy_at_cr.csv")
    gone = tidy[(tidy.variant == "magnitude") & (tidy.cr == 1000)].iloc[0]
    assert math.isnan(gone.acc_pct_mean) and gone.n_seeds == 0


def test_latex_tables_use_booktabs_and_have_the_rows(results_dir):
    report.write_report("g", results_dir)
    tex = (results_dir / "g" / "tolerance.tex").read_text()
    assert tex.isascii()  # compiles under plain pdflatex
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lllrrrr}"):
        assert rule in tex
    body = tex.split("\\midrule\n", 1)[1].split("\\bottomrule")[0]
    data = [ln for ln in body.splitlines() if ln.endswith(r"\\")]
    assert len(data) == 3
    assert data[0].startswith(r"LeNet-300-100 & MNIST & dwf D=3 & 2 & ") and r"$\pm$" in data[0]
    assert r"$\geq$ 100" in data[1]
    assert tex.count(r"\midrule") == 2  # after the header and between the two panels
    acc = (results_dir / "g" / "accuracy_at_cr.tex").read_text()
    assert "magnitude & 1 & 97.00 & 90.00 & --" in acc
    assert r"Dense accuracy: LeNet-300-100 / MNIST: 97.00 $\pm$ 1.41 \% (2 seeds)" in acc


def test_latex_escape():
    assert report.latex_escape("a_b & 5% ≥ 3 ± 1") == r"a\_b \& 5\% $\geq$ 3 $\pm$ 1"


def test_cli_report_prints_markdown_and_honours_options(results_dir, capsys):
    assert main(["report", "--grid", "g", "--results-dir", str(results_dir), "--tolerances", "2",
                 "--crs", "10,50"]) == 0
    out = capsys.readouterr().out
    assert "| arch | dataset | method | seeds | ≤ 2 pts |" in out
    assert "| arch | dataset | method | seeds | CR 10 | CR 50 |" in out


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("", "is empty"),
    ("method,arch\ndense,lenet300\n", "lacks required column(s) dataset, seed, test_acc, cr"),
])
def test_cli_report_on_missing_empty_or_malformed_csv(tmp_path, capsys, content, message):
    folder = tmp_path / "g"
    folder.mkdir()
    if content is not None:
        (folder / "results.csv").write_text(content)
    assert main(["report", "--grid", "g", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {folder / 'results.csv'}")
    assert message in err and "python -m benchmark collect --grid g" in err
    assert not (folder / "tolerance.md").exists()


def test_results_without_any_dense_run_still_give_the_accuracy_table(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    pd.DataFrame([result_row("magnitude", 0, 10, 0.9), result_row("magnitude", 0, 100, 0.8)]).to_csv(
        folder / "results.csv", index=False)
    _, markdown = report.write_report("g", tmp_path)
    assert "_no rows_" in markdown  # tolerance needs dense
    assert "lenet300/mnist: no dense run" in markdown
    assert "| LeNet-300-100 | MNIST | magnitude | 1 | 90.00 | 80.00 | – |" in markdown
    assert cv.load_results(folder / "results.csv").variants() == ["magnitude"]


def thresholded_rows() -> list[dict]:
    """Two DWF seeds whose CR depends on the threshold at lambda 1e-4 and not at 1e-3, and a dense run."""
    rows = [result_row("dense", 0, 1, 0.90) | {"wall_s": 36.0, "threads": 2, "epochs": 30, "device": "cpu"}]
    for seed in (0, 1):
        rows.append(result_row("dwf", seed, 50, 0.88, depth=3) | {
            "cell_id": f"a{seed}", "lam": 1e-4, "cr_thr_small": 20.0, "cr_thr_large": 80.0,
            "wall_s": 72.0, "threads": 1, "epochs": 30, "device": "cpu"})
        rows.append(result_row("dwf", seed, 500, 0.80, depth=3) | {
            "cell_id": f"b{seed}", "lam": 1e-3, "cr_thr_small": 495.0, "cr_thr_large": 505.0,
            "wall_s": 36.0, "threads": 1, "epochs": 30, "device": "cpu"})
    return rows


def test_settling_and_cost_tables_follow_the_records(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    pd.DataFrame(thresholded_rows()).to_csv(folder / "results.csv", index=False)
    report.write_report("g", tmp_path)
    settling = pd.read_csv(folder / "settling.csv")
    assert list(settling.lam) == [1e-4, 1e-4, 1e-3, 1e-3]
    assert list(settling.settled) == [False, False, True, True]  # 80/20 = 4 > 1.1; 505/495 < 1.1
    assert settling.ratio.iloc[0] == pytest.approx(4.0)
    md = (folder / "settling.md").read_text()
    assert "λ=0.0001, seed 0: 20 / 50 / 80" in md and "λ=0.001, seed 0" not in md
    cost = pd.read_csv(folder / "cost.csv").set_index("variant")
    # dwf: four cells of 72, 72, 36, 36 s on one thread = 216 s = 0.06 h; dense 36 s x 2 threads = 0.02 CPU-h
    assert cost.loc["dwf D=3", "wall_h"] == pytest.approx(216 / 3600)
    assert cost.loc["dwf D=3", "cpu_h"] == pytest.approx(216 / 3600)
    assert cost.loc["dense", "cpu_h"] == pytest.approx(72 / 3600)
    assert cost.loc["dwf D=3", "points"] == 4 and cost.loc["dwf D=3", "seeds"] == 2


def test_threshold_scale_moves_only_thresholded_records(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    rows = thresholded_rows() + [result_row("magnitude", 0, 50, 0.85)]
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    small = cv.load_results(folder / "results.csv", threshold_scale=0.01).ok.set_index("cell_id").cr
    large = cv.load_results(folder / "results.csv", threshold_scale=100).ok.set_index("cell_id").cr
    assert small["a0"] == 20 and large["a0"] == 80 and small["b1"] == 495
    magnitude = "magnitudeNone-lenet300-mnist-0-50"
    assert small[magnitude] == large[magnitude] == 50
    files, _ = report.write_report("g", tmp_path, threshold_scale=0.01)
    assert {p.name for p in files} >= {"tolerance-thr0.01x.md", "accuracy_at_cr-thr0.01x.csv"}
    assert (folder / "tolerance.md").exists() is False  # the default tables are not overwritten
    with pytest.raises(ValueError, match="threshold_scale=3"):
        cv.load_results(folder / "results.csv", threshold_scale=3)


def test_the_machines_table_names_each_cpu_model_and_marks_older_records(tmp_path):
    """Bit-level results compare only on one CPU model, so the page's machines table splits by it; records
    from before ``cpu_model`` was recorded say so instead of being merged with a named CPU."""
    from benchmark.analysis.page import machines

    rows = [result_row("dense", 0, 1.0, 0.9) | {"device": "cpu", "host": "a", "wall_s": 3600, "cpu_model": "AMD EPYC"},
            result_row("dense", 1, 1.0, 0.9) | {"device": "cpu", "host": "a", "wall_s": 1800,
                                                "cpu_model": "Intel(R) Xeon(R) Platinum 8480+"},
            result_row("dense", 2, 1.0, 0.9) | {"device": "cpu", "host": "a", "wall_s": 360}]
    (tmp_path / "g").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "g" / "results.csv", index=False)
    table = machines(cv.load_results(tmp_path / "g" / "results.csv"))
    assert dict(zip(table.cpu_model, table.hours)) == {"AMD EPYC": "1", "Intel(R) Xeon(R) Platinum 8480+": "0.5",
                                                        "not recorded": "0.1"}


def test_latex_escapes_every_name_that_goes_into_a_table(tmp_path):
    """A variant, a panel (dataset) and a grid named with TeX specials: the .tex files hold only
    their escaped forms, and outside comments no unescaped special except the column separators."""
    variant = "dwf_D=3 & 50% #1 $x {y}"
    rows = pd.DataFrame(hand_rows())
    rows["variant"] = [variant if r["method"] == "dwf" else cv.derive_variant(r["method"], r)
                       for r in rows.to_dict("records")]
    rows["dataset"] = "my_set#2"
    grid = "g_1%"
    (tmp_path / grid).mkdir()
    rows.to_csv(tmp_path / grid / "results.csv", index=False)
    files, _ = report.write_report(grid, tmp_path)
    escaped = report.latex_escape(variant)
    assert escaped == r"dwf\_D=3 \& 50\% \#1 \$x \{y\}"
    texts = {f.name: f.read_text() for f in files if f.suffix == ".tex"}
    assert sorted(texts) == ["accuracy_at_cr.tex", "comparisons.tex", "tolerance.tex"]
    for name, tex in texts.items():
        assert variant not in tex and escaped in tex, name
        assert r"my\_set\#2" in tex and "my_set" not in tex, name
        assert r"g\_1\%" in tex and r"\label{tab:g_1--" in tex, name  # caption escaped, label key sanitised
        for line in tex.splitlines():
            if line.startswith("%"):
                continue  # the generated-by comment
            bare = re.sub(r"\\label\{[^}]*\}", "", line).replace("\\\\", "")  # a key is not typeset
            for special in "%#_":
                assert special not in bare.replace("\\" + special, ""), (name, line)
        header = tex.split(r"\toprule", 1)[1].split(r"\midrule", 1)[0].strip()
        columns = header.count("&") - header.count(r"\&") + 1
        body = [ln for ln in tex.split(r"\midrule", 1)[1].splitlines() if ln.endswith(r"\\") and "&" in ln]
        assert body and all(ln.count("&") - ln.count(r"\&") + 1 == columns for ln in body), name


def test_report_writes_its_tables_atomically(results_dir, monkeypatch):
    """Every table goes through the one atomic write (docs/design.md): no file is written in place."""
    written = []
    real = report.atomic_write

    def recording(path, write, **options):
        written.append(path.name)
        real(path, write, **options)

    monkeypatch.setattr(report, "atomic_write", recording)
    files, _ = report.write_report("g", results_dir)
    assert sorted(written) == sorted(f.name for f in files)
    assert not [p for p in (results_dir / "g").iterdir() if ".tmp-" in p.name]
