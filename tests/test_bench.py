"""The benchmark suite's own logic: selection, timing statistics, and that each baseline it times computes
what ours computes (the reference transcriptions must be the same maths, or the ratios mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

import ucgm_convert as uc
from bench import guidance, loading, networks, runner, tuning
from bench.core import Timing, cell, ratio, rounds, summary
from ucgm_convert.errors import UCGMError
from ucgm_convert.model import checked_network
from ucgm_convert.settings.model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def test_only_selects_known_benchmarks_and_names_the_bad_one() -> None:
    assert runner.selected(None) == list(runner.BENCHMARKS)
    assert runner.selected("quality, sampler") == ["quality", "sampler"]
    # the long search proofs run only when named
    assert runner.selected("search_proof") == ["search_proof"] and "search_proof" not in runner.selected(None)
    with pytest.raises(UCGMError, match=r"--only: expected names among .*got 'speed'"):
        runner.selected("speed")


def test_a_bad_only_is_one_error_line() -> None:
    app = typer.Typer()
    app.command()(runner.command)
    result = CliRunner().invoke(app, ["--only", "nope", "--out", "unused"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --only: expected names among sampler, guidance, tuning, loading, precision, quality, demo, "
        "search_proof, search_demo, got 'nope'"]


def test_ratios_are_per_round_with_their_spread() -> None:
    assert ratio([2.0, 6.0, 3.0], [1.0, 2.0, 3.0]) == Timing(2.0, 1.0, 3.0)
    assert ratio([4.0], [1.0], scale=4) == Timing(1.0, 1.0, 1.0)
    assert summary([3.0, 1.0, 2.0]) == Timing(2.0, 1.0, 3.0)
    assert cell(Timing(1.0, 0.5, 2.0), 2) == "1.00 (0.50-2.00)"
    calls: list[str] = []
    times = rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a"]  # warm-up round, then interleaved in a rotating order
    assert [len(v) for v in times.values()] == [2, 2]


def test_the_reference_guidance_draws_our_samples() -> None:
    model = networks.build(networks.TINY, "cpu")
    x, y = networks.inputs(networks.TINY, 4, "cpu")
    ways = guidance._ways(model, x, y, steps=3)
    with torch.inference_mode():
        ours, ref, two = (ways[k]() for k in ("ours (batched)", "reference (2x state)", "two forwards"))
    torch.testing.assert_close(ref, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two, ours, atol=1e-5, rtol=1e-5)


def test_the_reference_tuning_step_has_our_loss_and_gradient() -> None:
    model = networks.build(networks.TINY, "cpu")
    objective, student, teacher, _, (x, y, t, z) = tuning._setup(model, 6, "cpu")
    ours = objective(student, x, y, teacher=teacher, t=t, z=z)
    grad_ours = torch.autograd.grad(ours, list(student.parameters()))
    ref = tuning.reference_loss(objective, student, teacher, x, y, t, z)
    grad_ref = torch.autograd.grad(ref, list(student.parameters()))
    torch.testing.assert_close(ref, ours, rtol=1e-5, atol=1e-6)
    for a, b in zip(grad_ref, grad_ours):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_every_architecture_builds_at_the_small_size() -> None:
    for spec in [networks.TINY, *networks.FAMILIES_SMALL]:
        model = networks.build(spec, "cpu")
        x, y = networks.inputs(spec, 2, "cpu")
        with torch.inference_mode():
            out = uc.sample(model, x, spec.transport, steps=1, y=y)
        assert out.shape == x.shape and bool(torch.isfinite(out).all()), spec.name


@pytest.mark.slow
def test_python_m_bench_writes_json(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--repeats", "1", "--only", "sampler,guidance",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for name in ("sampler", "guidance"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["name"] == name and result["rows"] and result["machine"]["torch"] == torch.__version__


def test_the_xl_networks_are_valid_full_size_configs() -> None:
    """`--size xl` cannot run here: each XL network is built and run on the meta device (no memory)."""
    for spec in networks.FAMILIES_XL:
        config = ModelConfig(family="ucgm", arch=spec.arch, arch_kwargs=spec.kwargs, transport=spec.transport,
                             num_classes=networks.NUM_CLASSES, latent_shape=spec.latent)
        params = sum(p.numel() for p in checked_network(config, spec.name).parameters())
        assert params > 400e6, spec.name  # released XL sizes: 600M-900M parameters
    for family in loading.FAMILIES:
        assert sum(p.numel() for p in loading.network(family, "xl", meta=True).parameters()) > 600e6, family
