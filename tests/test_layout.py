"""The package's shape holds: layers import downwards, families stay in their adapters, flags come from one place."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib
import typer.main

from ucgm_convert.adapters import FAMILIES
from ucgm_convert.cli import app
from ucgm_convert.cli.groups import ARCH, SAMPLING, TUNING
from ucgm_convert.cli.options import spellings
from ucgm_convert.jobs.source import ArchOverrides
from ucgm_convert.settings import SamplingSettings, TuningSettings

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ucgm_convert"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# Functions allowed to be longer, each with the reason stated here.
LONG_FUNCTIONS = {
    "sample": "the UCGM-S loop reads as the reference's uni_sample, one step per block",
}


def _sources() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *(ROOT / "adapters").rglob("*.py")])


def test_every_package_is_installed() -> None:
    """pyproject.toml lists every sub-package (a forgotten one would be missing from the wheel)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {"ucgm_convert." + ".".join(p.parent.relative_to(PACKAGE).parts) if p.parent != PACKAGE else "ucgm_convert"
             for p in PACKAGE.rglob("__init__.py")}
    assert set(config["packages"]) == found | {"ucgm_convert.adapters", "ucgm_convert.recipes",
                                                "ucgm_convert.bench"}


def test_modules_and_functions_stay_small() -> None:
    for path in _sources():
        text = path.read_text()
        assert len(text.splitlines()) <= MAX_MODULE_LINES, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in LONG_FUNCTIONS:
                assert node.end_lineno - node.lineno < MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name}"


def test_no_function_level_imports_of_our_own_modules() -> None:
    """Imports of the package sit at the top of each module, so the import graph is what readers see."""
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom):
                    assert inner.level == 0 and not (inner.module or "").startswith("ucgm_convert"), \
                        f"{path}:{inner.lineno}"
                if isinstance(inner, ast.Import):
                    assert not any(a.name.startswith("ucgm_convert") for a in inner.names), f"{path}:{inner.lineno}"


def test_nothing_outside_the_adapters_names_a_family() -> None:
    """No code outside adapters/ compares with or looks up a family name (docstring examples aside)."""
    names = {n for n in FAMILIES if n != "ucgm"}  # "ucgm" is also the library's tag
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "nets" / "__init__.py":
            continue  # architecture names (a DDT network is "ddt"), not families
        literals = {n.value for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not literals & names, path


def test_a_field_is_a_flag_on_every_command_of_its_group() -> None:
    """The sampling, tuning and architecture groups are generated from their settings models."""
    commands = {name: cmd for name, cmd in typer.main.get_command(app).commands.items()}
    commands["eval fid"] = commands.pop("eval").commands["fid"]  # type: ignore[attr-defined]

    def flags_of(command: str) -> set[str]:
        return {opt for p in commands[command].params for opt in p.opts}

    assert {f"--{n.replace('_', '-')}" for n in SamplingSettings.model_fields} <= set(spellings(SAMPLING))
    assert {f"--{n.replace('_', '-')}" for n in TuningSettings.model_fields} == set(spellings(TUNING))
    assert {f"--{n.replace('_', '-')}" for n in ArchOverrides.model_fields} == set(spellings(ARCH))
    for command in ("sample", "eval fid"):
        assert set(spellings(SAMPLING)) <= flags_of(command), command
    for command in ("sample", "eval fid", "convert", "tune", "prepare-data"):
        assert set(spellings(ARCH)) <= flags_of(command), command
    assert set(spellings(TUNING)) <= flags_of("tune")
    for name, command in commands.items():  # no flag is declared twice on one command
        opts = [opt for p in command.params for opt in p.opts]
        assert len(opts) == len(set(opts)), name


def test_every_setting_says_what_it_is() -> None:
    """Each field has a description: it is the --help text of its flag."""
    for model in (SamplingSettings, TuningSettings, ArchOverrides):
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name}"
