"""dwf-bench: Deep Weight Factorization against shallow factorization and pruning baselines.

Data flows one way: grid -> cells -> runner -> (method + train loop) -> result file -> CSV ->
plots and tables. See README.md and ``python -m benchmark --help``.
"""

__version__ = "0.1.0"
