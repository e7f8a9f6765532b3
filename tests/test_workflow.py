"""The researcher's workflow as typed: `run`, then `plot` and `report` with no other step, and the
results page `report` writes. Real runs of a tiny grid; nothing of the project is mocked."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from types import SimpleNamespace

import pandas as pd
import pytest

from benchmark.__main__ import main
from benchmark.execution.store import Store

pytestmark = pytest.mark.slow  # processes, clusters or whole grids: left out of make test-fast

GRID = """
description = "workflow test grid"
seeds = [0]
subset = 300
[[experiment]]
archs = ["lenet300"]
datasets = ["fashion-mnist"]
schedule = { epochs = 1, batch_size = 64 }
[experiment.methods.dense]
[[experiment.methods.dwf]]
depth = 2
lam = [1e-4, 1e-3]
[[experiment.methods.dwf]]
depth = 3
lam = 1e-3
lr = 1e6
[experiment.methods.magnitude]
target_cr = 10
"""


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The grid above, run once: five cells, one of which diverges (LR 1e6) and is recorded as failed."""
    base = tmp_path_factory.mktemp("workflow")
    (base / "g.toml").write_text(GRID)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["run", "--grid", str(base / "g.toml"), "--results-dir", str(base / "r"), "--no-progress"])
    assert code == 1, err.getvalue()  # the failed cell
    return SimpleNamespace(base=base, grid_file=base / "g.toml", results=base / "r", out=out.getvalue())


@pytest.fixture
def copy(ran, tmp_path):
    """A copy of the finished run's folder, for tests that change it."""
    shutil.copytree(ran.base, tmp_path / "w")
    return SimpleNamespace(grid_file=tmp_path / "w" / "g.toml", results=tmp_path / "w" / "r")


def test_run_writes_the_csvs_when_it_ends_also_after_a_failure(ran):
    folder = ran.results / "g"
    table = pd.read_csv(folder / "results.csv")
    assert sorted(table.status) == ["failed", "ok", "ok", "ok", "ok"]
    assert "Diverged" in table.loc[table.status == "failed", "error"].iloc[0]
    assert (folder / "layers.csv").is_file() and (folder / "history.csv").is_file()
    assert f"CSV: {folder / 'results.csv'} (5 rows: 4 ok, 1 failed)" in ran.out
    assert f"next: python -m benchmark plot --results-dir {ran.results}; python -m benchmark report" in ran.out
    assert json.loads((ran.results / "last-run.json").read_text())["grid"] == "g"
    recorded = Store(ran.results, "g").grid_record()
    assert recorded["toml"] == GRID and recorded["description"] == "workflow test grid"


def test_plot_without_grid_reads_the_last_run_and_says_so(ran, tmp_path, capsys):
    assert main(["plot", "--results-dir", str(ran.results), "--plots-dir", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert f"grid g: the last run in {ran.results}" in err
    assert "collected" not in err  # the CSV the run wrote is current
    assert (tmp_path / "p" / "g" / "accuracy_vs_cr.png").is_file()


def test_a_grid_file_counts_by_its_name(ran, capsys):
    assert main(["report", "--grid", str(ran.grid_file), "--results-dir", str(ran.results), "--no-page"]) == 0
    assert "| LeNet-300-100 | Fashion-MNIST | dwf D=2 |" in capsys.readouterr().out


def test_a_stale_or_missing_csv_is_collected_first(copy, capsys):
    store = Store(copy.results, "g")
    path = next(p for p in store.cells_dir.glob("*.json") if json.loads(p.read_text())["status"] == "ok")
    result = json.loads(path.read_text())
    result["records"][0]["test_acc"] = 0.123
    path.write_text(json.dumps(result))
    earlier = time.time() - 60  # the CSV older than the record, whatever the file system's clock resolution
    os.utime(store.root / "results.csv", (earlier, earlier))
    assert main(["report", "--results-dir", str(copy.results), "--no-page"]) == 0
    assert "results.csv was older than the newest result file" in capsys.readouterr().err
    assert 0.123 in set(pd.read_csv(store.root / "results.csv").test_acc)

    (store.root / "results.csv").unlink()
    assert main(["report", "--results-dir", str(copy.results), "--no-page"]) == 0
    assert "results.csv was missing" in capsys.readouterr().err
    assert (store.root / "results.csv").is_file()
    assert main(["report", "--results-dir", str(copy.results), "--no-page"]) == 0
    assert "collected" not in capsys.readouterr().err


def test_no_grid_and_no_record_of_a_run_is_a_message_naming_the_grids(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.csv").write_text("method\n")
    (tmp_path / "b" / "cells").mkdir(parents=True)
    assert main(["plot", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no --grid given and {tmp_path / 'last-run.json'} does not say which grid ran last" in err
    assert "name one with --grid (a, b)" in err
    assert main(["report", "--results-dir", str(tmp_path / "empty")]) == 2
    assert "run one first, e.g. python -m benchmark run --grid quick" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The results page
# ------------------------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Tags, image sources, links and text of a page; fails on unclosed elements."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self, text: str):
        super().__init__()
        self.open: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.tables = 0
        self.text: list[str] = []
        self.feed(text)
        self.close()
        assert not self.open, f"unclosed: {self.open}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "table":
            self.tables += 1
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_report_writes_one_self_contained_page(copy, capsys):
    assert main(["report", "--results-dir", str(copy.results)]) == 0
    page_path = copy.results / "g" / "report.html"
    assert f"page: {page_path}" in capsys.readouterr().err
    page = _Page(page_path.read_text())
    text = " ".join(page.text)
    for title in ("Largest CR within 1, 5, 10 points of dense", "Accuracy at CR 10, 100, 1000",
                  "DWF against every other curve at CR 10, 100, 1000", "Training cost per curve",
                  "Is sparsity settled?", "Failed or blocked cells", "Machines and versions"):
        assert title in text
    assert page.tables >= 7  # five tables, the failed cell, the machines
    assert len(page.images) == 4  # accuracy, per layer, effective CR, trajectories
    for src in page.images:  # embedded, and each a real PNG
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Diverged" in text  # the failed cell, named with its error
    assert 'lr = 1e6' in text and "workflow test grid" in text  # the grid as it ran
    assert "python -m benchmark run --grid " in text and "python -m benchmark report --grid g --results-dir" in text
    assert {"results.csv", "layers.csv", "history.csv", "tolerance.csv", "comparisons.csv"} <= set(page.links)
    assert not re.search(r"(src|href)=\"(https?:)?//", page_path.read_text())  # nothing fetched from elsewhere


def test_report_no_page_writes_no_page(copy):
    assert main(["report", "--results-dir", str(copy.results), "--no-page"]) == 0
    assert not (copy.results / "g" / "report.html").exists()
    assert (copy.results / "g" / "tolerance.md").is_file()


def test_a_page_without_a_recorded_grid_says_so(copy):
    from benchmark.analysis.page import write_page

    (copy.results / "g" / "grid.json").unlink()
    text = write_page("g", copy.results).read_text()
    assert "Not recorded" in text and "python -m benchmark run --grid g --results-dir" in text


CHROMIUM = next((shutil.which(n) for n in ("chromium-headless-shell", "chromium", "chromium-browser")
                 if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium or chromium-headless-shell")
def test_the_page_renders_every_figure_and_table_in_headless_chromium(copy, tmp_path):
    """A copy of the page with a script that counts, once loaded, the images that decoded and the
    tables with rows; the page itself carries no script."""
    assert main(["report", "--results-dir", str(copy.results)]) == 0
    page = (copy.results / "g" / "report.html").read_text()
    assert "<script" not in page
    probe = ("<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
             "document.title = 'rendered ' + imgs.filter(i => i.complete && i.naturalWidth > 100).length + '/' + "
             "imgs.length + ' images, ' + [...document.querySelectorAll('table')].filter(t => t.rows.length > 1 "
             "&& t.offsetHeight > 0).length + ' tables'; });</script></body>")
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe))
    # --no-sandbox: Chromium refuses to run as root with its sandbox; a fresh profile each time, and
    # no background traffic, so that no earlier state and no network (CI has none) play a part
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--no-first-run", "--virtual-time-budget=5000"]
    done = subprocess.run([*browser, f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom",
                           (tmp_path / "probe.html").as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(.*?)</title>", done.stdout)
    assert title, done.stderr[-2000:]
    assert title.group(1) == "rendered 4/4 images, 7 tables", title.group(1)
    # a picture of the page, for a person to look at (kept in pytest's tmp folder)
    shot = tmp_path / "report.png"
    done = subprocess.run([*browser, f"--user-data-dir={tmp_path / 'profile-shot'}", "--window-size=1200,2400",
                           "--hide-scrollbars", f"--screenshot={shot}", (copy.results / "g" / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, done.stderr[-2000:]
    print(f"screenshot of the page: {shot}")
