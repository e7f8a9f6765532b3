"""Datasets: registry, file formats, discovery on disk, and tensor-resident splits and batches.

One job per module, the public names gathered here (``from benchmark.engine import data as
data_mod; data_mod.load(...)``):

- ``registry``: ``DATASETS`` and ``DatasetSpec`` (shape, classes, normalization, where the files
  may sit, how they are read and downloaded);
- ``idx``, ``cifar``, ``tiny_imagenet``: the file formats (IDX, CIFAR pickles, Tiny ImageNet's
  folder of JPEGs with its decoded cache);
- ``discovery``: where a dataset's files are (``--data-dir``, ``$BENCHMARK_DATA``, ``./data``,
  system locations) and the explicit download step (``python -m benchmark data fetch NAME``),
  never done inside a training worker;
- ``tensors``: each split decoded once into one tensor on the training device, and the
  validation split;
- ``batching``: an epoch as a seeded permutation whose index slices are the batches, augmented
  as whole batches (no per-sample Python work of a ``DataLoader``).
"""

from benchmark.engine.data.batching import augment, batches, epoch_generator, to_device
from benchmark.engine.data.discovery import (DEFAULT_DATA_DIR, ENV_VAR, candidate_folders, fetch, fetch_command,
                                             locate, search_roots)
from benchmark.engine.data.errors import REFETCH, DatasetCorrupt, DatasetMissing, FetchFailed
from benchmark.engine.data.idx import IDX_FILES, idx_file, read_idx
from benchmark.engine.data.registry import DATASETS, TINY_IMAGENET_URL, DatasetSpec, get_spec
from benchmark.engine.data.tensors import VALIDATION_SEED, Data, Split, load, validation_indices
from benchmark.engine.data.tiny_imagenet import CACHE_ENV_VAR

__all__ = [
    "CACHE_ENV_VAR", "DATASETS", "DEFAULT_DATA_DIR", "ENV_VAR", "IDX_FILES", "REFETCH", "TINY_IMAGENET_URL",
    "VALIDATION_SEED", "Data", "DatasetCorrupt", "DatasetMissing", "DatasetSpec", "FetchFailed",
    "Split", "augment", "batches", "candidate_folders", "epoch_generator", "fetch", "fetch_command", "get_spec",
    "idx_file", "load", "locate", "read_idx", "search_roots", "to_device", "validation_indices",
]
