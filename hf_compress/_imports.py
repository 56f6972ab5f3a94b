"""Import-time helpers shared by the packages transformers may reach while it is still importing itself.

Registered architectures subclass transformers' modelling code, which cannot be imported half-way through
transformers' own import (design note 17): so their packages export names lazily, and their configs register the
model class only once the modelling module can be imported.
"""

from __future__ import annotations

import importlib
import sys


def lazy_attributes(package: str, mapping: dict[str, str]):
    """A module ``__getattr__`` that imports ``mapping[name]`` (a submodule of ``package``, or an absolute
    ``hf_compress…`` module) on first use."""

    def __getattr__(name):
        if name not in mapping:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        target = mapping[name]
        if not target.startswith("hf_compress"):
            target = "." + target.lstrip(".")
        return getattr(importlib.import_module(target, package), name)

    return __getattr__


def register_model_module(module_name: str) -> None:
    """Call ``module_name.register()``, unless that module is being imported right now (it registers itself)."""
    module = sys.modules.get(module_name)
    if module is not None and not hasattr(module, "register"):
        return
    importlib.import_module(module_name).register()
