"""Pruning and factorization methods. Importing this package registers every method."""

from methods.base import METHODS, Method, get_method, make_params, register  # noqa: F401
from methods import atinit, dense, dwf, l1, lottery, magnitude  # noqa: F401,E402  (one line per method module)
from methods import structured  # noqa: F401,E402
from methods import gmp, rigl, sparse_evolutionary  # noqa: F401,E402  (pruning during training)
