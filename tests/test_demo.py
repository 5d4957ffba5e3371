"""The embedded demo model and its procedural dataset: determinism, format, sample quality."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from torch import Tensor

import ucgm_convert as uc
from ucgm_convert.demo_data import CLASS_NAMES, make_shapes
from ucgm_convert.loading import embedded_path

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 5 * 1024 * 1024
PER_CLASS = 8


def _load_train_script() -> ModuleType:
    """scripts/train_demo.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_demo", REPO_ROOT / "scripts" / "train_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _features(x: Tensor) -> Tensor:
    """Flattened pixels plus a bias column, float64."""
    return torch.cat([x.flatten(1), torch.ones(x.shape[0], 1)], dim=1).double()


@pytest.fixture(scope="module")
def classifier() -> Tensor:
    """Ridge-regression weights on one-hot labels: a deterministic shape classifier fit in ~1 s."""
    x, y = make_shapes(4000, seed=123)
    f = _features(x)
    targets = torch.nn.functional.one_hot(y, len(CLASS_NAMES)).double()
    return torch.linalg.solve(f.T @ f + 10.0 * torch.eye(f.shape[1], dtype=torch.float64), f.T @ targets)


def _classify(weights: Tensor, x: Tensor) -> Tensor:
    return (_features(x) @ weights).argmax(dim=1)


def _sample_at_defaults(model: uc.GenerativeModel, labels: Tensor, seed: int = 0) -> Tensor:
    """Samples for `labels` with the sampling settings stored in the embedded config.json."""
    cfg = dict(json.loads((embedded_path("demo") / "config.json").read_text())["sampling"])
    scale = float(cfg.pop("cfg_scale", 1.0))
    interval = tuple(cfg.pop("cfg_interval", (0.0, 1.0)))
    fn = uc.guided(model, scale, interval) if scale != 1.0 else model
    noise = torch.randn((len(labels), *model.latent_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return uc.sample(fn, noise, transport=model.transport, y=labels, **cfg)


def _accuracy(model: uc.GenerativeModel, weights: Tensor, per_class: int = PER_CLASS) -> float:
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(per_class)
    return (_classify(weights, _sample_at_defaults(model, labels)) == labels).double().mean().item()


# --- dataset -------------------------------------------------------------------------------


def test_make_shapes_is_deterministic_per_seed() -> None:
    x1, y1 = make_shapes(200, seed=3)
    x2, y2 = make_shapes(200, seed=3)
    x3, y3 = make_shapes(200, seed=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert not torch.equal(y1, y3)


def test_make_shapes_shapes_ranges_and_balance() -> None:
    x, y = make_shapes(1000, seed=0)
    assert x.shape == (1000, 3, 16, 16) and x.dtype == torch.float32
    assert y.shape == (1000,) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    assert x.max() > 0.5 and x.min() < -0.8  # bright shapes on a dark background
    assert torch.bincount(y, minlength=10).tolist() == [100] * 10
    assert len(CLASS_NAMES) == 10
    # Soft edges: many pixels strictly between background and shape.
    assert ((x > -0.6) & (x < 0.3)).float().mean() > 0.01
    counts = torch.bincount(make_shapes(13, seed=1)[1], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert make_shapes(0)[0].shape == (0, 3, 16, 16)


def test_classes_are_separable_by_the_test_classifier(classifier: Tensor) -> None:
    x, y = make_shapes(500, seed=7)
    assert (_classify(classifier, x) == y).double().mean() >= 0.95


# --- embedded checkpoint ---------------------------------------------------------------------


def test_embedded_demo_loads() -> None:
    folder = embedded_path("demo")
    for name in ("model.safetensors", "config.json", "recipe.yaml", "README.md"):
        assert (folder / name).is_file(), name
    assert (folder / "model.safetensors").stat().st_size <= MAX_BYTES
    m = uc.load("embedded:demo")
    assert m.family == "ucgm"
    assert m.num_classes == 10 and m.null_class == 10
    assert m.latent_shape == (3, 16, 16)
    assert m.transport.name == "Linear"
    sampling = json.loads((folder / "config.json").read_text())["sampling"]
    assert {"steps", "order", "stochasticity", "extrapolation", "time_dist", "gaps",
            "cfg_scale", "cfg_interval"} <= set(sampling)
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    assert recipe["command"].startswith("python scripts/train_demo.py")
    assert recipe["command"] in (folder / "README.md").read_text()


def test_embedded_demo_samples_are_class_correct(classifier: Tensor) -> None:
    assert _accuracy(uc.load("embedded:demo"), classifier) >= 0.8


@pytest.mark.parametrize("dit_init", [True, False])
def test_class_check_fails_for_an_untrained_model(classifier: Tensor, dit_init: bool) -> None:
    """Negative control: the accuracy check above must not pass for a freshly built model."""
    torch.manual_seed(0)
    fresh = uc.GenerativeModel.build(uc.ModelConfig(**uc.load("embedded:demo").config))
    if dit_init:
        fresh.net.initialize_weights()
    assert _accuracy(fresh.eval(), classifier, per_class=3) < 0.5


# --- training script -------------------------------------------------------------------------


@pytest.mark.slow
def test_train_script_runs_end_to_end(tmp_path: Path) -> None:
    train_demo = _load_train_script()
    kwargs = {"steps": 3, "batch_size": 8, "lr": 1e-3, "seed": 0, "hidden_size": 32, "depth": 1, "num_heads": 2,
              "dataset_size": 40, "warmup": 1, "log_every": 1, "num_threads": None}
    returned = train_demo.train(out=tmp_path / "demo", **kwargs)
    train_demo.train(out=tmp_path / "again", **kwargs)
    m = uc.load(tmp_path / "demo")
    assert m.family == "ucgm" and m.num_classes == 10 and m.latent_shape == (3, 16, 16)
    assert m.config["arch_kwargs"]["hidden_size"] == 32
    state, other = m.net.state_dict(), uc.load(tmp_path / "again").net.state_dict()
    assert all(torch.equal(state[k], other[k]) for k in state)  # same seed -> same weights
    assert all(torch.equal(state[k], returned.net.state_dict()[k]) for k in state)
    assert any(state[k].abs().sum() > 0 for k in state if "final_layer.linear" in k)  # it learned
    recipe = yaml.safe_load((tmp_path / "demo" / "recipe.yaml").read_text())
    assert recipe["train"]["steps"] == 3 and recipe["train"]["hidden_size"] == 32
    assert "--steps 3" in recipe["command"]
    assert recipe["command"] in (tmp_path / "demo" / "README.md").read_text()
    x = torch.randn(2, 3, 16, 16)
    out = uc.sample(m, x, transport="Linear", steps=2, y=torch.tensor([0, 1]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_train_script_flags_default_to_its_defaults() -> None:
    train_demo = _load_train_script()
    args = train_demo.parse_args([])
    assert args.steps == train_demo.DEFAULTS["steps"]
    assert args.batch_size == train_demo.DEFAULTS["batch_size"]
    assert args.out == train_demo.DEFAULT_OUT
    assert train_demo.reproduce_command(dict(train_demo.DEFAULTS)) == "python scripts/train_demo.py"
