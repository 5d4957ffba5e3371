"""The README's promises: its Python quick start runs, and CI runs its install and test commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_python_quick_start_runs() -> None:
    (quick_start,) = [b for b in _blocks("python") if "uc.load(" in b]
    namespace: dict[str, object] = {}
    exec(compile(quick_start, "README.md", "exec"), namespace)
    assert namespace["x"].shape == (8, *namespace["m"].latent_shape)
    assert namespace["loss"].item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in namespace["student"].parameters())


def test_ci_runs_the_readme_install_and_test_commands() -> None:
    install, test = _blocks("bash")[0].strip().splitlines()[:2]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci
