"""The methods. Importing this package imports every module in it, which registers each method's options as a Hydra
schema (``<name>_schema`` in the ``method`` group) that ``conf/method/<name>.yaml`` starts from: a new method is its
file and its YAML, nothing else."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
