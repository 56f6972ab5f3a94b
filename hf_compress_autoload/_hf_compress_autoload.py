"""Interpreter-start hook of hf-compress: lets ``AutoModel*.from_pretrained`` (and PEFT's loaders) load
hf-compress checkpoints without ``import hf_compress`` — quantized checkpoints, hf-compress architectures and
adapters alike.

transformers has no plugin entry points, so ``hf_compress-autoload.pth`` (installed next to this module in
site-packages) imports this module at interpreter start. It only installs a meta-path finder — no torch, no
transformers — that registers hf-compress after transformers' modules finish importing. Registering an
architecture imports transformers' modelling code, which is only safe while none of it is half-imported, so
every transformers module is a trigger until registration is complete (each attempt is a cheap check);
``peft`` finishing its import registers the PEFT methods. ``HF_COMPRESS_AUTOLOAD=0`` switches it off;
hf-compress checkpoints then fail to load loudly.
"""

import os
import sys

_registering = False
_state = {"transformers_done": False, "peft_done": False}


def _register():
    global _registering
    if _registering:  # a trigger fired inside our own registration; the outer call finishes the job
        return
    _registering = True
    try:
        import hf_compress  # registers what it safely can on import

        done = hf_compress.register()
        _state["transformers_done"] = bool(done)
        _state["peft_done"] = bool(done) and "peft" in sys.modules and hf_compress.peft_registered()
    except Exception as exc:  # never break the user's import; say why loading will fail
        import warnings

        warnings.warn(f"hf-compress could not register with transformers ({exc!r}); its checkpoints will not load")
    finally:
        _registering = False


class _RegisterAfterImport:
    """Meta-path finder that wraps the loaders of trigger modules to register right after each runs."""

    def _is_trigger(self, fullname):
        if fullname == "peft":
            return not _state["peft_done"]
        return not _state["transformers_done"] and (fullname == "transformers" or fullname.startswith("transformers."))

    def find_spec(self, fullname, path=None, target=None):
        if _registering or not self._is_trigger(fullname):
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            module.__spec__._initializing = False  # its code has run; importing from it is safe from here on
            _register()
            if _state["transformers_done"] and _state["peft_done"] and self in sys.meta_path:
                sys.meta_path.remove(self)

        spec.loader.exec_module = exec_module
        return spec


def install():
    if os.environ.get("HF_COMPRESS_AUTOLOAD", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if "transformers" in sys.modules:
        _register()
    if not any(type(f).__name__ == "_RegisterAfterImport" for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


install()
