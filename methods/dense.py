"""The dense reference: the shared dense training, evaluated as it is."""

from __future__ import annotations

from benchmark.core.context import MethodContext
from benchmark.core.method import Method, register
from methods import structures


@register
class Dense(Method):
    """Dense reference model (no pruning)."""

    name = "dense"
    family = "reference"
    needs_dense = True
    is_reference = True
    columns = ("dense_wall_s",)

    class Workload(Method.Workload):
        def pack_family(self):
            return structures.DENSE, ()

    def run(self, ctx: MethodContext) -> list[dict]:
        dense = ctx.dense()
        return [ctx.measure(dense.model, history=dense.history, epochs=ctx.schedule.epochs,
                            dense_wall_s=dense.wall_s)]
