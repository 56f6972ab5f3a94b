"""Wheel layout for the design card's root folders.

``kernels/``, ``integrations/`` and ``model_cards/`` sit at the repository root but install as
``hf_compress.kernels`` etc. Hatch's ``sources`` rewrite would do it but breaks editable installs, and its
``force-include`` takes whole folders (it would also ship ``integrations/site_packages/``), so this hook lists the
files. Editable installs need none of them: ``hf_compress/__init__.py`` maps the three names to the checkout.
"""

from __future__ import annotations

from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

ROOT_FOLDERS = ("kernels", "integrations", "model_cards")
# Installed at fixed top-level places by pyproject's force-include, not inside the package.
NOT_IN_PACKAGE = ("integrations/site_packages", "integrations/optimum_command.py")


class RootFoldersHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if version == "editable":
            return
        root = Path(self.root)
        for folder in ROOT_FOLDERS:
            for path in sorted((root / folder).rglob("*")):
                relative = path.relative_to(root).as_posix()
                if path.is_file() and "__pycache__" not in path.parts and not relative.startswith(NOT_IN_PACKAGE):
                    build_data["force_include"][str(path)] = f"hf_compress/{relative}"
