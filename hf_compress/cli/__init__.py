"""``hf-compress`` command line (``commands``), with the quantization options generated from the registry
(``method_options``)."""

from hf_compress.cli.commands import build_parser, dispatch, main

__all__ = ["build_parser", "dispatch", "main"]
