"""Test-only start-up hook: Python imports it in every process whose PYTHONPATH starts with this
folder (tests/test_gpu_path.py and tests/test_gpu_check.py put it there for their subprocesses and
worker processes). Each behaviour is off unless its variable is set:

- ``DWF_TEST_BLOCK=torch_pruning,dask,distributed``: those imports fail as if not installed;
- ``DWF_TEST_HIDE_SYSTEM_DATA=1``: dataset discovery does not see the system folders
  (``/usr/share/datasets/...``), as on a machine without them;
- ``DWF_TEST_FAKE_GPUS=N``: torch reports N CUDA GPUs (``fakes.FakeCuda``), for code that only
  chooses devices.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_BLOCKED = {name for name in os.environ.get("DWF_TEST_BLOCK", "").split(",") if name}


class _NoSystemData(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "benchmark.engine.data":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            import dataclasses

            run(module)
            for key, dataset in list(module.DATASETS.items()):
                module.DATASETS[key] = dataclasses.replace(dataset, system_dirs=())

        spec.loader.exec_module = exec_module
        return spec


for _name in _BLOCKED:
    # None in sys.modules: ``import`` raises ModuleNotFoundError and importlib.util.find_spec
    # answers None, exactly as for a package that is not installed
    sys.modules[_name] = None
if os.environ.get("DWF_TEST_HIDE_SYSTEM_DATA"):
    sys.meta_path.insert(0, _NoSystemData())
if os.environ.get("DWF_TEST_FAKE_GPUS"):
    import fakes

    fakes.FakeCuda(int(os.environ["DWF_TEST_FAKE_GPUS"])).install(setattr)
