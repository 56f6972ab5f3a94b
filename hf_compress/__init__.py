"""hf-compress: layer-wise model compression, native to the Hugging Face stack.

Importing the package registers its methods with transformers lazily (as transformers loads the parts that
need them, see ``integrations.autoload``). Everything else loads on first use, so the interpreter-start hook
that makes checkpoints load without this import stays cheap.
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

_LAZY = {
    "quantize": "hf_compress.pipeline.quantize",
    "quantize_streaming": "hf_compress.pipeline.streaming",
    "HfcConfig": "hf_compress.config",
    "RTNConfig": "hf_compress.methods.rtn.config",
    "GPTQConfig": "hf_compress.methods.gptq.config",
    "LayerwiseQuantConfig": "hf_compress.methods.layerwise.config",
    "BAQConfig": "hf_compress.methods.baq.config",
    "HighImpactConfig": "hf_compress.methods.high_impact.config",
    "RSQConfig": "hf_compress.methods.rsq.config",
    "MagnitudeConfig": "hf_compress.methods.sparse.config",
    "WandaConfig": "hf_compress.methods.sparse.config",
    "SparseGPTConfig": "hf_compress.methods.sparse.config",
    "EcoflapConfig": "hf_compress.methods.ecoflap.config",
    "ArmorConfig": "hf_compress.methods.armor.config",
    "SparseLinear": "hf_compress.formats.sparse",
    "rotate_model": "hf_compress.methods.rsq.rotation",
    "plan_table": "hf_compress.plan",
    "plot_plan": "hf_compress.plan",
    "CalibrationSpec": "hf_compress.calibration.data",
    "save_pretrained": "hf_compress.integrations.hub",
    "load_model": "hf_compress.models",
    "perplexity": "hf_compress.evaluation",
    "size_report": "hf_compress.report",
    "PackedLinear": "hf_compress.formats.linear",
    "PackedEmbedding": "hf_compress.formats.embedding",
    "kernel_report": "hf_compress.kernels.report",
    "export": "hf_compress.exporters",
    "profile": "hf_compress.sensitivity",
    "SensitivityProfile": "hf_compress.sensitivity",
    "LNRemovalSchedule": "hf_compress.methods.ln_free.schedule",
    "LNRemovalCallback": "hf_compress.methods.ln_free.callback",
    "LisaCallback": "hf_compress.methods.lisa.callback",
    "LisaConfig": "hf_compress.methods.lisa.callback",
    "push_to_hub": "hf_compress.integrations.hub",
    "render_card": "hf_compress.integrations.model_card",
    "record_card_inputs": "hf_compress.integrations.card_inputs",
    "perplexity_result": "hf_compress.integrations.card_inputs",
    "Method": "hf_compress.registry",
    "register_method": "hf_compress.registry",
    "methods": "hf_compress.registry",
}

__all__ = [*_LAZY, "register", "__version__"]


def register() -> bool:
    """Register hf-compress's methods with transformers now (PEFT methods register once ``peft`` is imported);
    safe to call any number of times. Returns whether the transformers registrations are done (False when
    called from inside transformers' own import: they then finish as soon as that import does).

    Importing hf-compress does not need this: it installs the lazy registration of ``integrations.autoload``.
    """
    from hf_compress.integrations import autoload

    return autoload.register_now()


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_compress' has no attribute {name!r}")


class _CheckoutFolders:
    """In a source checkout, the design card's root folders ``kernels/``, ``integrations/`` and ``model_cards/`` are
    the subpackages ``hf_compress.kernels`` etc. (the wheel ships them inside ``hf_compress/``). Python has no way
    to map one subpackage to another folder, so this finder does it — for exactly these three names. The folders
    have no ``__init__.py``, so from the repository root plain ``import kernels`` never finds a package of ours
    that could shadow Hugging Face's ``kernels`` (which transformers probes)."""

    def __init__(self, folders):
        self.folders = folders

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.folders:
            return None
        from importlib.machinery import ModuleSpec

        spec = ModuleSpec(fullname, None, is_package=True)  # a namespace package over the root folder
        spec.submodule_search_locations = [self.folders[fullname]]
        return spec


def _map_checkout_folders() -> None:
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    folders = {f"{__name__}.{n}": os.path.join(root, n) for n in ROOT_FOLDERS
               if not os.path.isdir(os.path.join(here, n)) and os.path.isdir(os.path.join(root, n))}
    if folders and not any(isinstance(f, _CheckoutFolders) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutFolders(folders))


ROOT_FOLDERS = ("kernels", "integrations", "model_cards")
_map_checkout_folders()
importlib.import_module("hf_compress.integrations.autoload").install()
