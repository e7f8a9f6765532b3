"""The built-in methods, one module per family; importing this package registers each of them.

Methods depend on ``benchmark.core`` (the interface) and ``benchmark.engine`` (models, training,
metrics) only. Methods from other packages register through the ``dwf_bench.methods`` entry-point
group instead (``benchmark.core.method``).
"""

from benchmark.core.method import METHODS, Method, all_methods, get_method, make_params, register  # noqa: F401
from methods import atinit, dense, dwf, l1, lottery, magnitude  # noqa: F401,E402  (one line per method module)
from methods import structured  # noqa: F401,E402
from methods import gmp, rigl, sparse_evolutionary  # noqa: F401,E402  (pruning during training)
