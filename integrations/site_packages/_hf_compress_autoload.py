"""Interpreter-start hook of hf-compress (imported by ``hf_compress-autoload.pth`` in site-packages).

It imports nothing at start-up: it only waits for the first ``transformers`` or ``peft`` import and hands it to
``hf_compress.integrations.autoload``, whose finder registers hf-compress lazily (see there). Set
``HF_COMPRESS_AUTOLOAD=0`` to switch it off; hf-compress checkpoints then fail to load loudly.
"""

import os
import sys


class _HandOff:
    """Meta-path finder that replaces itself with hf-compress's registering finder on the first watched import."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] not in ("transformers", "peft"):
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            from hf_compress.integrations import autoload

            finder = autoload.install()
        except Exception as exc:  # never break the user's import; say why loading will fail
            import warnings

            warnings.warn(f"hf-compress could not register with transformers ({exc!r}); its checkpoints will not load")
            return None
        return None if finder is None else finder.find_spec(fullname, path, target)


def install():
    if os.environ.get("HF_COMPRESS_AUTOLOAD", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if not any(type(f).__name__ in ("_HandOff", "RegisterAfterImport") for f in sys.meta_path):
        sys.meta_path.insert(0, _HandOff())


install()
