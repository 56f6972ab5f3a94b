"""The method registry: what generic code (pipeline, quantizer, CLI, model card, Hub, autoload) asks instead of
naming methods.

A method is one folder under ``hf_compress/methods/`` whose ``__init__.py`` calls :func:`register_method` with a
:class:`Method`; third-party code (or a test) calls it the same way. Everything a ``Method`` points at is a
``"module:attribute"`` string, imported only when used — compare transformers' lazy auto mappings — so listing
methods (``hf-compress methods``, the interpreter-start hook) imports no torch and no modelling code.

Built-in methods are discovered by name from :data:`BUILTIN_METHODS` (imported with importlib rather than
statically, so the registry sits below the method folders in the import graph and no cycle forms).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

# One registration line per built-in method folder.
BUILTIN_METHODS = ("rtn", "gptq", "layerwise", "baq", "high_impact", "rsq", "recursive", "ln_free", "lisa", "kvtuner", "cskv", "sparse", "ecoflap", "armor", "ti_qat", "lineas", "diffrate")


@dataclass(frozen=True, eq=False)
class Method:
    """A compression method as the generic code sees it.

    Args:
        name: registry and CLI name (``"high-impact"``).
        summary: one line for ``hf-compress methods`` and the README table.
        title: display name in model cards (default: ``name``).
        kind: ``"quantization"`` (a ``QuantizationConfig``), ``"architecture"`` (a registered model type),
            ``"peft"`` or ``"training"`` (a Trainer callback).
        paper: Markdown citation shown in model cards.
        config: ``"module:Class"`` of its ``HfcConfig`` subclass (quantization methods).
        cli: ``"module:function"`` adding the method's own sub-command (``add_command(subparsers)``), for methods
            that are no quantization config; quantization methods get their options from the config's signature.
        command: the sub-command's name when it is not ``name`` (one command shared by a family of methods).
        model_types: ``{model_type: artifact kind}`` of its checkpoints; ``register_architecture``
            (``"module:function"``) registers their configs with ``AutoConfig``.
        peft_types: ``{peft_type: artifact kind}`` of its adapters; ``register_peft`` adds them to PEFT's mappings.
        recognize: ``"module:function"`` (``config dict -> kind | None``) for checkpoints no model type names
            (e.g. a plain GPT-2 that is LN-free).
        card: ``{kind: "module:function"}`` rendering the card of each artifact kind it makes
            (``(artifact, model) -> (template name, fields, png bytes)``).
    """

    name: str
    summary: str
    kind: str = "quantization"
    title: str | None = None
    paper: str | None = None
    config: str | None = None
    cli: str | None = None
    model_types: dict[str, str] = field(default_factory=dict)
    register_architecture: str | None = None
    peft_types: dict[str, str] = field(default_factory=dict)
    register_peft: str | None = None
    recognize: str | None = None
    card: dict[str, str] = field(default_factory=dict)
    command: str | None = None

    def __post_init__(self):
        if self.title is None:
            object.__setattr__(self, "title", self.name)
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "quantization" and not self.config:
            raise ValueError(f"quantization method {self.name!r} needs config='module:ConfigClass'")

    @property
    def quant_method(self) -> str | None:
        """The ``quant_method`` its configs write to ``config.json``."""
        return None if self.config is None else resolve(self.config).quant_method

    def config_class(self):
        return None if self.config is None else resolve(self.config)


@dataclass(frozen=True)
class OptionGroup:
    """Options every quantization config accepts (e.g. RSQ's rotation and token weighting), owned by one method.

    Args:
        name: heading in CLI help.
        defaults: option name → default; the base config stores them on every config.
        validate: ``"module:function"`` called with the config after construction.
        prepare_model: ``"module:function"`` ``(model, config) -> None`` run before planning (e.g. rotate).
        token_weights: ``"module:function"`` ``(config) -> callback | None`` weighting calibration tokens.
        help: option name → help text.
    """

    name: str
    defaults: dict
    validate: str | None = None
    prepare_model: str | None = None
    token_weights: str | None = None
    help: dict[str, str] = field(default_factory=dict)


KINDS = ("quantization", "architecture", "peft", "training")
_METHODS: dict[str, Method] = {}
_OPTION_GROUPS: dict[str, OptionGroup] = {}
_loaded = False


def resolve(target: str):
    """Import ``"module:attribute"``."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def register_method(method: Method, replace: bool = False) -> Method:
    """Add ``method``; it is then quantizable/loadable (quantization), listed by the CLI and shown in cards."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method expects a Method, got {type(method).__name__}")
    if method.name in _METHODS and not replace and _METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    _on_register(method)
    return method


def register_option_group(group: OptionGroup) -> OptionGroup:
    _OPTION_GROUPS[group.name] = group
    return group


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BUILTIN_METHODS:
            importlib.import_module(f"hf_compress.methods.{name}")


def methods(kind: str | None = None) -> list[Method]:
    """Registered methods (built-ins first, in registration order), optionally of one kind."""
    _load_builtins()
    return [m for m in _METHODS.values() if kind is None or m.kind == kind]


def get_method(name: str) -> Method:
    _load_builtins()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(_METHODS)}")
    return _METHODS[name]


def method_for_quant_method(quant_method: str) -> Method | None:
    """The quantization method whose configs carry ``quant_method`` (None if none does)."""
    for method in methods("quantization"):
        if method.quant_method == quant_method:
            return method
    return None


def method_for_artifact(kind: str) -> Method | None:
    for method in methods():
        if kind in method.card:
            return method
    return None


def option_groups() -> list[OptionGroup]:
    _load_builtins()
    return list(_OPTION_GROUPS.values())


# -- what registering does beyond the table: make a late (third-party) quantization method loadable ----------------
_listeners: list = []


def on_register(callback) -> None:
    """Call ``callback(method)`` for every method registered from now on (the autoload uses this)."""
    _listeners.append(callback)


def _on_register(method: Method) -> None:
    for callback in _listeners:
        callback(method)
