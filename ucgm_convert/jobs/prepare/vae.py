"""Which VAE prepare-data encodes with, and how its latents are normalised: asked of the model or its family.

Base spec: `--checkpoint` (the spec in the model's config and its stored VAE weights), else
`--from RECIPE` (the VAE defaults its family's adapter declares, the recipe's VAE weights and
resolution), else `--vae` alone. `--vae` also names the weights to load when a recipe or checkpoint
gives the spec; `--latent-mean` / `--latent-std` / `--pixel-range` override single fields.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...adapters import get_family
from ...checkpoint import VAE_WEIGHTS_NAME, is_checkpoint_dir, read_config
from ...errors import UCGMError
from ...formats.safetensors_file import read_safetensors
from ...foundation import looks_like_hub_id
from ...loading import load, resolve_source
from ...recipe import Recipe, load_recipe, recipe_names
from ...settings.model import VAES, VaeSpec
from ...vae import as_spec, hub_folder, load_vae

# Published conventions of Hub VAEs that ship no usable normalisation: the DiT / SiT scale.
KNOWN_VAES = {
    "stabilityai/sd-vae-ft-ema": {"name": "sd-vae", "latent_mean": 0.0, "latent_std": 1 / 0.18215,
                                  "pixel_range": "-1,1"},
    "stabilityai/sd-vae-ft-mse": {"name": "sd-vae", "latent_mean": 0.0, "latent_std": 1 / 0.18215,
                                  "pixel_range": "-1,1"},
}
IDENTITY = {"name": "identity", "source": None}


@dataclass
class ResolvedVae:
    spec: VaeSpec
    module: torch.nn.Module
    resolution: int
    latent_shape: tuple[int, int, int] | None  # what the model expects, when known
    origin: str


def _diffusers_config(folder: Path) -> dict[str, Any] | None:
    for candidate in (folder / "config.json", folder / "vae" / "config.json"):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError) as err:
                raise UCGMError(f"{candidate}: not a readable JSON config: {err}") from None
            return data if isinstance(data, dict) else None
    return None


def _spec_from_vae_source(source: str) -> tuple[dict[str, Any], str | None]:
    """(spec fields, local path for load_vae) of `--vae NAME_OR_PATH` without a recipe or checkpoint.

    Known Hub ids use their published convention; a diffusers folder (or Hub repo) its config's
    scaling_factor / shift_factor; bare weights need --latent-mean / --latent-std.
    """
    if source == "identity":
        return dict(IDENTITY), None
    if source in VAES:
        raise UCGMError(f"--vae {source}: names a kind of VAE, not its weights; pass a file, a diffusers folder or "
                        "a Hugging Face repo id (e.g. stabilityai/sd-vae-ft-ema), or --from RECIPE")
    path = Path(source).expanduser()
    if path.exists():
        local = path
    elif not looks_like_hub_id(source):
        raise UCGMError(f"--vae {source}: unknown VAE: no such file or folder, not a Hugging Face repo id "
                        "(user/name) and not 'identity'")
    elif source in KNOWN_VAES:
        return {**KNOWN_VAES[source], "source": source}, None
    else:
        local = hub_folder(source)
    config = _diffusers_config(local) if local.is_dir() else None
    if config is None:
        return {"name": None, "source": source}, str(local)  # the name from the weights, statistics from flags
    cls = config.get("_class_name")
    if cls == "AutoencoderDC":
        name = "dc-ae"
    elif cls == "AutoencoderKL":
        name = "sd-vae" if int(config.get("latent_channels", 4)) == 4 else "ldm-f16d32"
    else:
        raise UCGMError(f"--vae {source}: config.json has _class_name {cls!r}; expected a diffusers AutoencoderKL "
                        "or AutoencoderDC")
    scale = config.get("scaling_factor") or 1.0
    shift = config.get("shift_factor") or 0.0
    return {"name": name, "source": source, "latent_mean": float(shift), "latent_std": 1 / float(scale),
            "pixel_range": "-1,1"}, str(local)


def _spec_from_recipe(recipe: Recipe) -> dict[str, Any]:
    """The VAE spec fields a recipe implies: its family's declared defaults with the recipe's weights."""
    if recipe.vae == "identity":
        return dict(IDENTITY)
    return {**get_family(recipe.family).vae_defaults, "source": recipe.vae}


def _checkpoint_vae(checkpoint: str, family: str | None, overrides: dict[str, Any]
                    ) -> tuple[dict[str, Any], Any, tuple[int, int, int], str | None]:
    """(VAE spec fields, stored VAE weights or None, latent shape, recipe name) of a model checkpoint.

    A published checkpoint is loaded with the architecture overrides; if its adapter can only guess
    the latent statistics (and warns so), that is an error here: the latents would be stored wrongly.
    """
    path = resolve_source(checkpoint)
    if is_checkpoint_dir(path):  # our format: config.json is enough
        cfg = read_config(path)
        stored = path / VAE_WEIGHTS_NAME
        state = read_safetensors(stored) if stored.is_file() else None
        return cfg.vae.to_dict(), state, cfg.latent_shape, cfg.recipe
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load(checkpoint, family=family, **overrides)
    guesses = [str(w.message) for w in caught if "latent statistics" in str(w.message)]
    if guesses:
        raise UCGMError(f"{guesses[0].split(';')[0]}: prepare-data needs the real statistics: pass --latent-stats "
                        "PATH (or --latent-mean and --latent-std)")
    return model.cfg.vae.to_dict(), model.vae_state, model.cfg.latent_shape, model.cfg.recipe


def _parse_stat(value: Any, flag: str) -> float | list[float] | None:
    if value is None:
        return None
    try:
        parts = [float(p) for p in str(value).split(",") if p.strip()]
    except ValueError:
        raise UCGMError(f"{flag}: expected a number or comma-separated numbers (one per channel), "
                        f"got {value!r}") from None
    if not parts:
        raise UCGMError(f"{flag}: expected a number or comma-separated numbers, got {value!r}")
    return parts[0] if len(parts) == 1 else parts


def resolve_vae(
    vae: str | None = None,
    recipe: str | None = None,
    checkpoint: str | None = None,
    resolution: int | None = None,
    latent_mean: Any = None,
    latent_std: Any = None,
    pixel_range: str | None = None,
    family: str | None = None,
    overrides: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ResolvedVae:
    """The checked VAE spec, its network and the resolution, from the flags (see the module doc)."""
    spec: dict[str, Any] | None = None
    weights_path: str | None = None
    state = None
    model_shape = None
    rec = load_recipe(recipe) if recipe is not None else None
    if checkpoint is not None:
        spec, state, model_shape, model_recipe = _checkpoint_vae(checkpoint, family, overrides or {})
        origin = f"checkpoint {checkpoint}"
        if rec is None and model_recipe in recipe_names():
            rec = load_recipe(model_recipe)
    elif rec is not None:
        spec = _spec_from_recipe(rec)
        origin = f"recipe {rec.name}"
    elif vae is not None:
        spec, weights_path = _spec_from_vae_source(vae)
        origin = f"--vae {vae}"
    else:
        raise UCGMError("no VAE: pass --vae NAME_OR_PATH ('identity' for pixel-space models, a VAE file, diffusers "
                        "folder or Hub repo id), --from RECIPE or --checkpoint MODEL")
    if vae is not None and origin != f"--vae {vae}":
        if vae == "identity" and spec["name"] != "identity":
            raise UCGMError(f"--vae identity: the {origin} works in {spec['name']!r} latents, not pixels")
        if vae != "identity":
            weights_path = vae
            spec = {**spec, "source": vae}  # record the weights actually used
    given = {"latent_mean": _parse_stat(latent_mean, "--latent-mean"),
             "latent_std": _parse_stat(latent_std, "--latent-std"), "pixel_range": pixel_range}
    spec = {"pixel_range": "-1,1", **spec, **{k: v for k, v in given.items() if v is not None}}
    if spec["name"] != "identity" and not {"latent_mean", "latent_std"} <= set(spec):
        if rec is not None and get_family(rec.family).latent_stats_in_checkpoint:
            raise UCGMError(f"{origin}: the latent statistics of {rec.family} models are stored with the model "
                            "checkpoint: pass --checkpoint MODEL (the model you will tune), or --latent-mean and "
                            "--latent-std")
        raise UCGMError(f"{origin}: bare VAE weights carry no latent statistics: pass --latent-mean and --latent-std "
                        "(numbers or one per channel), --from RECIPE, or a diffusers folder / Hub repo with "
                        "config.json")
    if resolution is None:
        if rec is not None:
            resolution = rec.resolution
        elif spec["name"] == "identity" and model_shape is not None:
            resolution = model_shape[1]
        else:
            raise UCGMError(f"{origin}: --resolution is required (image side in pixels, e.g. 256)")
    name_from_weights = spec["name"] is None  # bare KL weights: sd-vae or ldm-f16d32 by the latent channels
    checked = as_spec({**spec, "name": "sd-vae"} if name_from_weights else spec)
    module = load_vae(checked, path=weights_path, state=state, device=device, dtype=dtype)
    if name_from_weights and hasattr(module, "config"):
        checked = checked.replace(name="sd-vae" if int(module.config.latent_channels) == 4 else "ldm-f16d32")
    return ResolvedVae(checked, module, int(resolution), model_shape, origin)
