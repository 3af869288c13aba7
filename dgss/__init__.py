"""dgss: domain-generalized semantic segmentation with vision foundation models on one clean PyTorch + Lightning stack.

The front door, for use from Python (each command line tool calls the same function with its composed config):

- :func:`evaluate` (``dgss-eval``): a composed Hydra config in, the metrics out; training, prediction and merging
  are ``dgss.train.train(cfg)``, ``dgss.predict.predict(cfg)`` and ``dgss.restore.merge`` (``dgss.train``,
  ``dgss.predict`` and ``dgss.merge`` are the commands' modules, so the front door leaves those names to them);
- :func:`~dgss.config.build_method`: a composed config to the method (backbone + head + tuning), untrained;
- :func:`~dgss.restore.load_method`: a checkpoint (a path or ``hf://user/name``) to the trained method and its config;

They are imported on first use (``dgss.load_method``), so a tool that needs none of them (``dgss-convert``) does
not pay for Lightning, Hydra and timm.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("dgss")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

#: public name -> the module that defines it
ENTRY_POINTS = {"evaluate": "dgss.eval", "build_method": "dgss.config", "load_method": "dgss.restore"}
__all__ = ["__version__", "build_method", "evaluate", "load_method"]

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on first use
    from dgss.config import build_method
    from dgss.eval import evaluate
    from dgss.restore import load_method


def __getattr__(name: str):
    if name in ENTRY_POINTS:
        return getattr(importlib.import_module(ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'dgss' has no attribute {name!r}")
