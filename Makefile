# Two commands work on a fresh machine (they create .venv, install, and make sure the default
# dataset is there):  `make run` runs the quick grid and writes its CSV, plots, tables and page;
# `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install first; pinned to the copy this project is tested with. Override for
# another platform, e.g.  make run TORCH="torch torchvision"
TORCH ?= torch==2.14.1 torchvision==0.29.1
JOBS ?= 2
GRID ?= quick
# Packing (docs/scaling.md) is off for the committed grids: their records were trained one
# cell per process, and a packed float32 run sums in another order (accuracies differ by ~0.05 points).
# make run PACK=auto packs where it measures faster on this device.
PACK ?= off
STAMP := $(VENV)/.installed

# The committed reference results (reference/, reference/README.md): resumes from the committed cell
# records (finished cells are never retrained), then rebuilds CSVs, figures and tables from them.
# SEEDS=0 restricts training to seed 0; with every cell finished it trains nothing. The calibration
# grid mixes schedule lengths and learning rates on purpose, so it gets tables but no curve figures.
# lenet-reference-v1, the first protocol, is history: its tables are rebuilt, nothing of it trains
# (its LeNet-5 part stopped at seed 0 and most of seed 1 when LeNet-5 got its tune table).
SEEDS ?=
# LeNet-5 trains channels-last, the faster layout on the CPU: on four committed LeNet-5 cells it stayed
# within seed noise of the contiguous records (reference/channels-last/comparison.md, docs/scaling.md).
REFERENCE_RUN = $(PY) -m benchmark run --results-dir reference --jobs $(JOBS) --pack off $(if $(SEEDS),--seeds $(SEEDS))

.PHONY: run test test-fast test-packages setup data clean reference gpu-check gpu-check-bare

# A failed or blocked cell makes `run` exit 1; it still writes the grid's CSVs, which are plotted and
# tabled; then the failures are said again, last, and make exits with run's status.
run: setup data
	@status=0; $(PY) -m benchmark run --grid $(GRID) --jobs $(JOBS) --pack $(PACK) || status=$$?; \
	$(PY) -m benchmark plot --grid $(GRID) && $(PY) -m benchmark report --grid $(GRID) || exit $$?; \
	echo "CSV: results/$(GRID)/results.csv  plots: plots/$(GRID)/  tables: results/$(GRID)/tolerance.md  page: results/$(GRID)/report.html"; \
	if [ $$status -ne 0 ]; then echo "NOT ALL CELLS FINISHED (run exited $$status):"; \
	  $(PY) -m benchmark status --grid $(GRID) --errors | tail -n 25; exit $$status; fi

reference: setup data
	-$(REFERENCE_RUN) --grid lenet-calibration
	-$(REFERENCE_RUN) --grid lenet-reference
	-$(REFERENCE_RUN) --grid lenet-recipes
	$(PY) -m benchmark collect --grid lenet-calibration --results-dir reference
	$(PY) -m benchmark report --grid lenet-calibration --results-dir reference > /dev/null
	for grid in lenet-reference-v1 lenet-reference; do \
	  $(PY) -m benchmark collect --grid $$grid --results-dir reference && \
	  $(PY) -m benchmark plot --grid $$grid --results-dir reference --plots-dir reference --at-cr 1000 && \
	  $(PY) -m benchmark report --grid $$grid --results-dir reference --crs 10,30,100,300,1000 > /dev/null && \
	  $(PY) -m benchmark report --grid $$grid --results-dir reference --crs 10,30,100,300,1000 --threshold-scale 0.01 > /dev/null \
	  || exit $$?; done
	$(PY) -m benchmark collect --grid lenet-reference-tuning --results-dir reference
	$(PY) -m benchmark collect --grid lenet-recipes --results-dir reference
	@echo "reference: CSVs, figures and tables in reference/lenet-reference/ and reference/lenet-reference-v1/ (reference/README.md)"

test: setup data test-packages
	$(PY) -m pytest -q

# The inner loop: unit and small-integration tests (566 without a GPU; 1-1.5 minutes on the 2-core machine):
# no process kills, worker pools, clusters, whole grids or long trainings, which are marked slow
# and run in `make test` (CI).
test-fast: setup data
	$(PY) -m pytest -q -m "not slow"

# Debian packages some tests need: slurm-wlm + munge (a private SLURM, tests/test_slurm.py) and
# chromium (the report page, tests/test_workflow.py). Installed when missing and we are root with
# apt; otherwise, or if apt fails, those tests skip and say why, and the build goes on.
test-packages:
	@missing=""; \
	command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 || missing="$$missing slurm-wlm"; \
	command -v munged >/dev/null 2>&1 || missing="$$missing munge"; \
	command -v chromium >/dev/null 2>&1 || command -v chromium-headless-shell >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian packages for the tests:$$missing"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
	    || echo "warning: apt-get could not install$$missing; the tests that need them will skip"; \
	fi

# On a machine with a CUDA GPU: the CUDA tests, one short cell per method family, doctor, perf
# step/pack, one epoch each of LeNet-300-100 and VGG-16, and cells per hour with --jobs-per-gpu 1/2
# and packing, in under 8 minutes; writes gpu-check/summary.md (and one log per part). It brings its
# own data. Without a GPU it says so and exits 2.
gpu-check: setup
	$(PY) -m benchmark.speed.gpu_check --out gpu-check --budget 450

# The same on a lent GPU machine as it is: its own python (CUDA torch, torchvision, numpy, pandas,
# matplotlib, seaborn, joblib, scipy, pytest), no venv, no network, no installs.
gpu-check-bare:
	$(PYTHON) -m benchmark.speed.gpu_check --out gpu-check --budget 450

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,cluster]'
	touch $@

# Fashion-MNIST: already found (--data-dir, $$BENCHMARK_DATA, ./data, /usr/share/datasets), else
# Debian's package when we are root with apt, else a torchvision download into ./data.
data: setup
	@$(PY) -m benchmark data check fashion-mnist >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  fi; \
	  $(PY) -m benchmark data check fashion-mnist >/dev/null 2>&1 || $(PY) -m benchmark data fetch fashion-mnist; }

clean:
	rm -rf $(VENV) results plots *.egg-info
