"""Execution: grids become validated cells, cells run (alone or packed) on local workers or Dask, results land in the store."""
