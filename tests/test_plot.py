"""Figures from hand-made CSVs: panels, lines, log axes, legends, per-layer bars, files and CLI."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from benchmark.analysis import curves as cv  # noqa: E402
from benchmark.analysis import plot, plot_layers, plot_style  # noqa: E402
from benchmark.__main__ import build_parser, main  # noqa: E402

PANELS = [("lenet300", "mnist"), ("lenet5", "fashion-mnist")]
LAYERS = [("fc1", 1000), ("fc2", 100), ("fc3", 10)]


def result_row(method, seed, cr, acc, arch="lenet300", dataset="mnist", depth=None, status="ok", cr_effective=None,
               level="") -> dict:
    return {"grid": "g", "cell_id": f"{method}{depth}-{arch}-{dataset}-{seed}-{cr}", "method": method,
            "variant": cv.derive_variant(method, {"depth": depth}), "arch": arch, "dataset": dataset, "seed": seed,
            "depth": depth, "level": level, "test_acc": acc, "cr": cr,
            "cr_effective": cr if cr_effective is None else cr_effective, "status": status}


def grid_rows() -> list[dict]:
    """Two panels, two seeds, dense + dwf D=2, dwf D=3, magnitude (magnitude absent on lenet5)."""
    rows = []
    for arch, dataset in PANELS:
        for seed in (0, 1):
            rows.append(result_row("dense", seed, 1.0, 0.98, arch, dataset))
            for cr, acc in [(10, 0.97), (100, 0.90), (1000, 0.60)]:
                rows.append(result_row("dwf", seed, cr * (1 + seed), acc, arch, dataset, depth=2))
                rows.append(result_row("dwf", seed, cr * (1 + seed), acc + 0.01, arch, dataset, depth=3))
                if arch == "lenet300":
                    rows.append(result_row("magnitude", seed, cr, acc - 0.05 * seed, arch, dataset,
                                           cr_effective=cr * 1.5 if cr == 1000 else cr))
    return rows


def layer_rows(results_rows) -> list[dict]:
    """Per-layer sparsity: fc3 fully pruned (collapse) in magnitude runs, 50 % elsewhere."""
    rows = []
    for r in results_rows:
        for index, (name, numel) in enumerate(LAYERS):
            sparsity = 1.0 if (r["method"] == "magnitude" and name == "fc3") else 0.5 + 0.1 * index
            rows.append({"cell_id": r["cell_id"], "level": r["level"], "layer": name, "layer_index": index,
                         "numel": numel, "nonzero": round(numel * (1 - sparsity)), "effective": 0,
                         "sparsity": sparsity})
    return rows


@pytest.fixture
def results_dir(tmp_path):
    rows = grid_rows()
    folder = tmp_path / "results" / "g"
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    pd.DataFrame(layer_rows(rows)).to_csv(folder / "layers.csv", index=False)
    return tmp_path / "results"


@pytest.fixture
def results(results_dir):
    return cv.load_results(results_dir / "g" / "results.csv")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def labelled_lines(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_accuracy_figure_has_one_log_panel_per_arch_dataset_and_one_line_per_variant(results):
    fig = plot.plot_accuracy_vs_cr(results)
    assert len(fig.axes) == 2
    first, second = fig.axes
    assert first.get_title() == "LeNet-300-100 / MNIST" and second.get_title() == "LeNet-5 / Fashion-MNIST"
    assert all(ax.get_xscale() == "log" for ax in fig.axes)
    assert "%" in first.get_ylabel() and "compression" in first.get_xlabel()
    assert labelled_lines(first) == ["dwf D=2", "dwf D=3", "magnitude"]
    assert labelled_lines(second) == ["dwf D=2", "dwf D=3"]  # partial grid: magnitude missing, no crash
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["dwf D=2", "dwf D=3", "magnitude", "dense (mean over seeds)"]


def test_accuracy_figure_draws_the_seed_mean_in_percent_and_the_dense_line(results):
    fig = plot.plot_accuracy_vs_cr(results)
    ax = fig.axes[0]
    magnitude = next(line for line in ax.get_lines() if line.get_label() == "magnitude")
    x, y = magnitude.get_data()
    # magnitude seeds share CRs: at CR 100 accuracies 0.90 and 0.85 -> mean 87.5 %
    at_100 = np.flatnonzero(np.isclose(x, 100))
    assert y[at_100[0]] == pytest.approx(87.5)
    # dwf seed 1 is measured at twice seed 0's CRs, so the mean line spans only 20..1000 (both seeds)
    dwf = next(line for line in ax.get_lines() if line.get_label() == "dwf D=2")
    x, y = dwf.get_data()
    drawn = np.asarray(x)[np.isfinite(y)]
    assert drawn.min() == pytest.approx(20) and drawn.max() == pytest.approx(1000)
    dense = [line for line in ax.get_lines() if np.allclose(line.get_ydata(), 98.0) and len(line.get_ydata()) == 2]
    assert dense, "dense reference line at 98 % missing"
    assert len(ax.collections) >= 3  # one std band per variant (two seeds each)


def test_dwf_depths_get_different_colours_and_markers(results):
    styles = plot_style.variant_styles(results.variant_info())
    assert styles["dwf D=2"].color != styles["dwf D=3"].color
    assert styles["dwf D=2"].marker != styles["dwf D=3"].marker
    assert styles["magnitude"].linestyle != styles["dwf D=2"].linestyle  # another family


def test_layer_figure_shows_each_variants_run_closest_to_the_cr(results, results_dir):
    layers = cv.load_layers(results_dir / "g" / "layers.csv")
    fig, notes = plot_layers.plot_layer_sparsity(results, layers, at_cr=100)
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["fc1", "fc2", "fc3"]
    labels = [c.get_label() for c in ax.containers]
    # dwf seed 0 sits at CR 100 exactly; seed 1 at 200 is farther
    assert labels == ["dwf D=2 (CR 100, seed 0)", "dwf D=3 (CR 100, seed 0)", "magnitude (CR 100, seed 0)"]
    heights = [p.get_height() for p in ax.containers[0].patches]
    assert heights == pytest.approx([50.0, 40.0, 30.0])  # kept % = 100 * (1 - sparsity)
    collapsed = ax.containers[2].patches[2].get_height()
    assert np.isnan(collapsed)  # fc3 of magnitude pruned to nothing: no bar but an x marker
    assert any(line.get_marker() == "x" for line in ax.get_lines())
    assert notes == []


def test_layer_figure_leaves_out_variants_far_from_the_cr(results, results_dir):
    layers = cv.load_layers(results_dir / "g" / "layers.csv")
    fig, notes = plot_layers.plot_layer_sparsity(results, layers, at_cr=20000)
    # the largest CR anywhere is 2000 (dwf seed 1) and 20000 / 2000 = 10 > 5: no run qualifies
    assert fig is None
    assert any("no run within a factor 5 of CR 20000" in n for n in notes)


def test_layer_figure_shows_a_variant_whose_nearest_run_is_a_few_times_off(results, results_dir):
    """The quick grid's DWF D=4 is nearest CR 100 at CR 380: drawn, its legend saying so (issue 29)."""
    layers = cv.load_layers(results_dir / "g" / "layers.csv")
    fig, notes = plot_layers.plot_layer_sparsity(results, layers, at_cr=4500)
    labels = [c.get_label() for c in fig.axes[0].containers]
    assert labels == ["dwf D=2 (CR 2,000, seed 1)", "dwf D=3 (CR 2,000, seed 1)", "magnitude (CR 1,000, seed 0)"]
    assert notes == []


def _lab(rgb) -> np.ndarray:
    """CIELAB (D65) of an sRGB colour, to compare colours as eyes do."""
    c = np.asarray(rgb, float)
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    f = np.cbrt(xyz / np.array([0.95047, 1.0, 1.08883]))
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_dwf_depths_stay_vivid_blues_apart_from_every_baseline():
    """Issue 29: the dark DWF depths were hard to tell from GMP and SynFlow (and D=2 from SET)."""
    from benchmark.core.method import all_methods
    info = {f"dwf D={d}": ("dwf", {"depth": d}) for d in (2, 3, 4)}
    info |= {name: (name, {}) for name in all_methods() if name not in ("dwf", "dense")}
    styles = plot_style.variant_styles(info)
    for depth in ("dwf D=2", "dwf D=3", "dwf D=4"):
        lab = _lab(styles[depth].color)
        assert np.hypot(lab[1], lab[2]) > 45, depth  # saturated, not near-black
        for other in info:
            if not other.startswith("dwf") and other != "shallow":  # shallow is D=2's kin on purpose
                assert np.linalg.norm(lab - _lab(styles[other].color)) > 30, (depth, other)


def test_default_cr_of_layer_figure_is_the_median_largest_cr_up_to_100(results):
    assert plot_layers.default_at_cr(results, "lenet300", "mnist") == 100
    small = results.rows[results.rows.cr <= 10]
    smaller = cv.Results(results.path, small.reset_index(drop=True))
    maxima = smaller.rows[(smaller.rows.arch == "lenet300") & (smaller.rows.dataset == "mnist")
                          & (smaller.rows.method != "dense")].groupby("variant").cr.max()
    assert plot_layers.default_at_cr(smaller, "lenet300", "mnist") == float(maxima.median()) <= 10


def test_effective_figure_only_shows_variants_where_it_differs(results):
    fig = plot.plot_effective_cr(results)
    assert len(fig.axes) == 1  # only lenet300 has a difference (magnitude at CR 1000)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert labelled_lines(ax) == ["magnitude"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    # the methods without a difference are named, so a reader knows where they went
    assert any(t.startswith("not shown (effective = direct") and "dwf D=3" in t for t in legend)
    assert not any("magnitude" in t for t in legend if t.startswith("not shown"))
    x, y = ax.get_lines()[0].get_data()
    assert list(zip(x, y))[-1] == (1000, 1500)


def test_no_effective_figure_when_effective_equals_direct(tmp_path):
    path = tmp_path / "g" / "results.csv"
    path.parent.mkdir()
    pd.DataFrame([result_row("dense", 0, 1, 0.98), result_row("snip", 0, 10, 0.9)]).to_csv(path, index=False)
    assert plot.plot_effective_cr(cv.load_results(path)) is None


def test_write_plots_writes_png_and_pdf(results_dir, tmp_path):
    files, notes = plot.write_plots("g", results_dir, tmp_path / "plots", at_cr=100)
    names = sorted(p.name for p in files)
    assert names == sorted(f"{stem}.{fmt}" for stem in ("accuracy_vs_cr", "layer_sparsity", "effective_cr")
                           for fmt in ("png", "pdf"))
    assert all(p.parent == tmp_path / "plots" / "g" and p.stat().st_size > 1000 for p in files)
    assert any("lenet5/fashion-mnist: no ok results for magnitude" in n for n in notes)


def test_the_same_figure_gives_the_same_files(tmp_path):
    """A rebuilt figure is byte for byte the one before when its results did not change (the PDF
    carries no creation date), so regenerating the committed reference shows no spurious change."""
    import time

    import matplotlib.pyplot as plt

    def saved(folder):
        fig, ax = plt.subplots()
        ax.plot([1, 10, 100], [0.9, 0.8, 0.5])
        return {p.name: p.read_bytes() for p in plot.save_figure(fig, tmp_path / folder / "figure")}

    first = saved("a")
    time.sleep(1.1)  # a creation date would now differ by at least a second
    second = saved("b")
    assert sorted(first) == ["figure.pdf", "figure.png"]
    assert [name for name in first if first[name] != second[name]] == []


def test_missing_layers_csv_is_a_note_not_an_error(results_dir, tmp_path):
    (results_dir / "g" / "layers.csv").unlink()
    files, notes = plot.write_plots("g", results_dir, tmp_path / "plots")
    assert not any("layer_sparsity" in p.name for p in files)
    assert any("layers.csv does not exist" in n for n in notes)


def test_cli_plot_and_its_errors(results_dir, tmp_path, capsys):
    assert main(["plot", "--grid", "g", "--results-dir", str(results_dir), "--plots-dir", str(tmp_path / "p"),
                 "--at-cr", "100"]) == 0
    assert (tmp_path / "p" / "g" / "accuracy_vs_cr.png").exists()
    capsys.readouterr()
    assert main(["plot", "--grid", "nothing", "--results-dir", str(results_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "python -m benchmark collect --grid nothing" in err
    (results_dir / "g" / "results.csv").write_text("arch,dataset\nlenet300,mnist\n")
    assert main(["plot", "--grid", "g", "--results-dir", str(results_dir)]) == 2
    assert "lacks required column(s) method, seed, test_acc, cr" in capsys.readouterr().err


def test_every_plot_and_report_flag_is_explained():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("plot", "report"):
        for action in commands[name]._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 15, (name, action.dest)
    with pytest.raises(SystemExit):
        parser.parse_args(["plot", "--at-cr", "-3"])
