"""Interpreter-start hook of hf-compress: lets ``AutoModel*.from_pretrained`` load hf-compress checkpoints
without ``import hf_compress``.

transformers has no plugin entry points for quantizers, so ``hf_compress-autoload.pth`` (installed next to
this module in site-packages) imports this module at interpreter start. It only installs a meta-path finder —
no torch, no transformers — and registers hf-compress the moment ``transformers.quantizers`` finishes
importing. ``HF_COMPRESS_AUTOLOAD=0`` switches it off; hf-compress checkpoints then fail to load loudly.
"""

import os
import sys

_TRIGGER = "transformers.quantizers"


def _register():
    try:
        import hf_compress  # registers on import
    except Exception as exc:  # never break the user's transformers import; say why loading will fail
        import warnings

        warnings.warn(f"hf-compress could not register with transformers ({exc!r}); its checkpoints will not load")


class _RegisterAfterImport:
    """Meta-path finder that wraps the loader of ``transformers.quantizers`` to register right after it runs."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def install():
    if os.environ.get("HF_COMPRESS_AUTOLOAD", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if _TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


install()
