"""CLI options generated from the registry: every keyword of every quantization config is a flag.

A method's options are the parameters of its config's ``__init__`` (and of the base config and the registered
option groups), so a method added to the registry is reachable from the CLI with all its options, and no option
can be forgotten. Types come from the annotations or the defaults; ``True`` defaults become ``--no-NAME``.
Flags default to "not given", so the config's own defaults apply and a flag the chosen method does not take is
an error instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
from pathlib import Path

from hf_compress.registry import methods, option_groups

# Not CLI options: results written back by quantization, the plan itself, and what the CLI passes otherwise
# (`--dataset` is the calibration source, `--skip` fills modules_to_not_convert, the tokenizer is MODEL's).
NOT_OPTIONS = {"self", "kwargs", "plan", "report", "tokenizer", "dataset", "modules_to_not_convert"}
CLI_DEFAULTS = {"group_size": 64}  # the benchmark protocol's grid; the configs' library default is 128
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple": float, "list": float}


def _arg_type(param: inspect.Parameter):
    """Python type of a config parameter, from its annotation (``float | None``) or its default."""
    text = param.annotation if isinstance(param.annotation, str) else getattr(param.annotation, "__name__", "")
    names = [n for n in re.split(r"[\s|\[\],]+", str(text)) if n and n != "None"]
    if names and names[0] in _TYPES:
        return _TYPES[names[0]], names[0] in ("tuple", "list")
    default = param.default
    if isinstance(default, (tuple, list)):
        return (type(default[0]) if default else float), True
    return (type(default) if default not in (None, inspect.Parameter.empty) else str), False


def config_parameters(cls) -> dict[str, inspect.Parameter]:
    """The keyword options a config class takes (its own, the base config's, the option groups')."""
    from hf_compress.config import HfcConfig

    params = {}
    for klass in reversed([c for c in cls.__mro__ if issubclass(c, HfcConfig)]):
        for name, p in inspect.signature(klass.__init__).parameters.items():
            if name not in NOT_OPTIONS and p.kind is p.POSITIONAL_OR_KEYWORD:
                params[name] = p
    for group in option_groups():
        for name, default in group.defaults.items():
            params[name] = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
    return {n: p for n, p in params.items() if n not in getattr(cls, "derived_keys", ())}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_table() -> list[dict]:
    """Per quantization method, its flags as plain data (name, type, nargs, choices, help).

    Building it imports every config class, hence transformers and torch (~3 s); ``--help`` and argument errors
    should be instant, so the table is cached on disk, keyed by the package's source files (path, size, mtime)
    and the registered methods: any change to the code or the registry rebuilds it. An unwritable cache only
    costs the rebuild."""
    import hashlib
    import json

    from hf_compress.cache import cache_dir

    path = cache_dir() / f"cli-options-{_fingerprint(hashlib.sha256()).hexdigest()[:20]}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    table = _build_option_table()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, path)  # concurrent CLIs never read a half-written table
    except OSError:
        pass
    return table


def _fingerprint(digest):
    import hf_compress

    root = Path(hf_compress.__file__).parent
    for file in sorted(root.rglob("*.py")):
        st = file.stat()
        digest.update(f"{file.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    for method in methods("quantization"):
        digest.update(f"{method.name}={method.config};".encode())
    for group in option_groups():
        digest.update(f"group={group.name};".encode())
    return digest


def _build_option_table() -> list[dict]:
    from hf_compress.formats.packing import SUPPORTED_BITS

    table, seen = [], {}
    for method in methods("quantization"):
        cls = method.config_class()
        flags = []
        for name, param in config_parameters(cls).items():
            kind, many = _arg_type(param)
            if name in seen:
                if seen[name] != (kind, many):
                    raise TypeError(f"config option {name!r} has type {kind.__name__} in {cls.__name__} but "
                                    f"{seen[name][0].__name__} in another method: the CLI needs one type per name")
                continue
            seen[name] = (kind, many)
            widths = kind is int and (name == "bits" or name.endswith("_bits"))  # a code width: what packing stores
            flags.append({"name": name, "type": kind.__name__, "many": many, "default_true": param.default is True,
                          "choices": list(SUPPORTED_BITS) if widths else None, "help": _help(cls, name)})
        table.append({"method": method.name, "flags": flags})
    return table


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """``--method`` and one flag per config option over all quantization methods (grouped per method in --help)."""
    table = option_table()
    parser.add_argument("--method", choices=[m["method"] for m in table], default="gptq",
                        help="quantization method (`hf-compress methods` lists them)")
    parser.add_argument("--skip", action="append", default=[], metavar="REGEX",
                        help="keep modules whose name matches REGEX dense (repeatable)")
    for method in table:
        group = parser.add_argument_group(f"{method['method']} options")
        for opt in method["flags"]:
            name, kind, help_text = opt["name"], _TYPES[opt["type"]], opt["help"]
            if kind is bool:
                if opt["default_true"]:
                    group.add_argument(flag(f"no_{name}"), dest=name, action="store_false", default=argparse.SUPPRESS,
                                       help=help_text)
                else:
                    group.add_argument(flag(name), dest=name, action="store_true", default=argparse.SUPPRESS,
                                       help=help_text)
            else:
                choices = opt["choices"]
                group.add_argument(flag(name), dest=name, type=kind, nargs="+" if opt["many"] else None,
                                   choices=choices, default=argparse.SUPPRESS, help=help_text,
                                   metavar="{%d..%d}" % (choices[0], choices[-1]) if choices else None)


def _help(cls, name: str) -> str | None:
    for group in option_groups():
        if name in group.help:
            return group.help[name]
    for klass in cls.__mro__:
        doc = inspect.getdoc(klass) or ""
        match = re.search(rf"^\s*(?:[\w, ]*\b{name}\b[\w, ]*):\s*(.+?)(?=^\s*\w[\w, ]*:|\Z)", doc, re.M | re.S)
        if match:
            return " ".join(match.group(1).split()).replace("%", "%%")
    return None


def config_from_args(args: argparse.Namespace):
    """The chosen method's config from the flags that were given (others keep the config's defaults)."""
    from hf_compress.registry import get_method

    method = get_method(args.method)
    cls = method.config_class()
    accepted = config_parameters(cls)
    given = {n: getattr(args, n) for n in _all_option_names() if hasattr(args, n)}
    foreign = sorted(n for n in given if n not in accepted)
    if foreign:
        raise ValueError(f"--method {method.name} takes no {', '.join(flag(n) for n in foreign)} "
                         f"(its options: {', '.join(flag(n) for n in accepted)})")
    kwargs = {**{k: v for k, v in CLI_DEFAULTS.items() if k in accepted}, **given}
    if "ratios" in kwargs:
        kwargs["ratios"] = tuple(kwargs["ratios"])
    return cls(modules_to_not_convert=args.skip, **kwargs)


def _all_option_names() -> set[str]:
    return {n for m in methods("quantization") for n in config_parameters(m.config_class())}
