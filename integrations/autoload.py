"""Lazy registration with transformers and PEFT, so checkpoints load without ``import hf_compress``.

transformers has no plugin entry points, so an interpreter-start hook (``_hf_compress_autoload``, installed by
a ``.pth`` file) hands the first ``transformers``/``peft`` import to the finder below. The finder registers
nothing at ``import transformers``: each registration waits for the transformers module that needs it, which
is what keeps the hook cheap (a tokenizer-only script never pays for quantizers or modelling code):

* ``transformers.models.auto.configuration_auto`` loaded → our model types map to their config classes
  (configs are light; each config class registers its model class when an instance is built, i.e. when a
  checkpoint of that type is actually loaded);
* ``transformers.quantizers.auto`` loaded → our ``quant_method`` names map to their configs and the quantizer;
* ``peft`` loaded → our PEFT methods join PEFT's mappings.

A registration imports transformers code, which is only safe while no transformers module is half-imported,
so it runs when the outermost import of a watched module (transformers', PEFT's or ours) has finished (a depth
count over the loaders this finder wraps). ``HF_COMPRESS_AUTOLOAD=0`` switches the start hook off; ``import hf_compress`` installs the
finder anyway.
"""

from __future__ import annotations

import importlib
import sys

WATCHED = ("transformers", "peft", "hf_compress")  # our own modules too: one may be importing transformers


def _registry():
    """The method registry, imported at the first registration rather than at ``import transformers`` (which must
    import none of our modules); from then on a method registered late (a plugin, a test) becomes loadable at once."""
    global _listening
    import hf_compress.registry as registry

    if not _listening:
        _listening = True
        registry.on_register(_late_method)
    return registry


def _register_architectures():
    registry = _registry()
    for method in registry.methods():
        if method.register_architecture:
            registry.resolve(method.register_architecture)()


def _register_quantizers():
    importlib.import_module("hf_compress.pipeline.quantize").register()


def _register_peft_methods():
    registry = _registry()
    for method in registry.methods():
        if method.register_peft:
            registry.resolve(method.register_peft)()
    importlib.import_module("hf_compress.integrations.peft_packed").register()  # LoRA on packed modules


def _late_method(method) -> None:
    """A method registered after its trigger ran (a plugin, a test) becomes loadable at once."""
    for trigger, register in REGISTRATIONS.items():
        if trigger in _done:
            register()


# trigger module → registration; each runs once, after its trigger module is loaded
REGISTRATIONS = {
    "transformers.models.auto.configuration_auto": _register_architectures,
    "transformers.quantizers.auto": _register_quantizers,
    "peft": _register_peft_methods,
}
_done: set[str] = set()
_depth = 0
_listening = False


def _is_watched(fullname: str) -> bool:
    return fullname.partition(".")[0] in WATCHED


def run_pending() -> bool:
    """Run every registration whose trigger module is loaded; True when all have run."""
    global _depth
    if _depth:  # inside a watched import (or a registration): modules may be half-initialised
        return False
    for trigger, register in REGISTRATIONS.items():
        module = sys.modules.get(trigger)
        if trigger in _done or module is None or getattr(module.__spec__, "_initializing", False):
            continue
        _depth += 1  # the imports a registration makes must not start registrations themselves
        try:
            register()
        except (ImportError, AttributeError):  # a module it needs is still importing (outside our loaders): retry later
            continue
        finally:
            _depth -= 1
        _done.add(trigger)
    return len(_done) == len(REGISTRATIONS)


class RegisterAfterImport:
    """Meta-path finder that wraps watched modules' loaders to count import depth and register afterwards."""

    def find_spec(self, fullname, path=None, target=None):
        if not _is_watched(fullname):
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            global _depth
            _depth += 1
            try:
                original_exec(module)
            finally:
                _depth -= 1
            module.__spec__._initializing = False  # its code has run; importing from it is safe from here on
            if run_pending() and self in sys.meta_path:
                sys.meta_path.remove(self)

        spec.loader.exec_module = exec_module
        return spec


def install() -> RegisterAfterImport | None:
    """Register what the loaded modules allow now and watch for the rest (idempotent); returns the finder."""
    if run_pending():
        return None
    for finder in sys.meta_path:
        if isinstance(finder, RegisterAfterImport):
            return finder
    finder = RegisterAfterImport()
    sys.meta_path.insert(0, finder)
    return finder


def register_now() -> bool:
    """Import transformers' trigger modules and register with them now (for explicit callers; heavy). PEFT
    methods register when ``peft`` is imported. Returns whether the transformers registrations are done."""
    install()
    if _depth:  # called from inside transformers' own import; the finder finishes the job
        return False
    for trigger in REGISTRATIONS:
        if trigger.startswith("transformers."):
            importlib.import_module(trigger)
    run_pending()
    return all(t in _done for t in REGISTRATIONS if t.startswith("transformers."))
