"""Recipes of REPA, SiT and DiT (sources and borrowed values) and the EDM2 checkpoint pins.

Published values checked against their files: LINs-lab/UCGM configs/tuning_few_steps/
in1k256_sit_xl_sdvae_linear.yaml (sample: 2 steps, stochast_ratio 1.0, rfba_gap_steps [0.001, 0.60]),
cccvs/UCGM@0b5e768's copy of it (optimizer, transport, train), the UCGM README (REPA UCGM-T 1.95 at
NFE 2), NVlabs/edm2 generate_images.py @4bf8162 (the *-fid presets) and README (dataset-refs/img512.pkl).
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ucgm_convert.cli import app
from ucgm_convert.recipe import load_recipe, recipe_text

EDM2_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm2"
# recipe: (preset pickle of its "before" FID, that FID) -- generate_images.py's edm2-img512-*-fid presets
EDM2_PINS = {
    "edm2-s": ("edm2-img512-s-2147483-0.130.pkl", 2.56),
    "edm2-l": ("edm2-img512-l-1879048-0.085.pkl", 2.06),
    "edm2-xxl": ("edm2-img512-xxl-0939524-0.070.pkl", 1.91),
}
# recipe: (family, model, resolution, transport, before NFE, before FID)
BORROWING = {
    "sit": ("sit", "SiT-XL/2", 256, "ReLinear", "250x2", 2.06),
    "dit-256": ("dit", "DiT-XL/2", 256, "DiscreteVP", "250x2", 2.27),
    "dit-512": ("dit", "DiT-XL/2", 512, "DiscreteVP", "250x2", 3.04),
}


def test_repa_published_values() -> None:
    r = load_recipe("repa")
    assert (r.family, r.model, r.resolution, r.transport, r.vae) == ("repa", "SiT-XL/2", 256, "Linear",
                                                                     "stabilityai/sd-vae-ft-ema")
    assert (r.paper_tuned.nfe, r.paper_tuned.fid) == ("2", 1.95)
    f = r.few_step_sampling
    assert (f.steps, f.stochasticity, f.gaps, f.cfg_scale) == (2, 1.0, (0.001, 0.6), 1.0)
    t = r.tuning
    assert (t.steps, t.global_batch, t.ema_decay, t.huber_eps, t.label_drop) == (800, 1024, 0.99, 5.0, 0.1)
    assert (t.enhanced, t.enhanced_style) == (1.7, "fc-vs-fe")
    for field in ("few_step_sampling.gaps", "tuning.steps", "tuning.huber_eps", "tuning.lr", "paper_tuned",
                  "tuning.enhanced", "tuning.enhanced_style"):
        assert r.provenance(field) == "published", field
    assert r.provenance("sampling.steps") == ("borrowed from cccvs/UCGM@0b5e768 "
                                              "configs/tuning_few_steps/in1k256_sit_xl_sdvae_linear.yaml")
    assert "configs/tuning_few_steps/in1k256_sit_xl_sdvae_linear.yaml" in r.source


@pytest.mark.parametrize("name", sorted(BORROWING))
def test_sit_and_dit_recipes_borrow_everything_but_their_own_sampler(name: str) -> None:
    family, model, resolution, transport, nfe, fid = BORROWING[name]
    r = load_recipe(name)
    assert (r.family, r.model, r.resolution, r.transport) == (family, model, resolution, transport)
    assert (r.paper_before.nfe, r.paper_before.fid) == (nfe, fid) and r.paper_after is r.paper_tuned is None
    assert "not published" in r.description
    for section in ("sampling", "few_step_sampling", "tuning"):
        fields = type(getattr(r, section)).model_fields
        assert all(r.provenance(f"{section}.{f}").startswith("borrowed from ") for f in fields), section
    assert (r.sampling.cfg_scale, r.sampling.cfg_interval) == (1.5, (0.0, 1.0))  # the upstream sampler's own
    assert r.tuning.label_drop == 0.1  # trained with class dropout 0.1: the null class exists


@pytest.mark.parametrize("name", sorted(EDM2_PINS))
def test_edm2_recipes_pin_the_measured_checkpoint_and_reference(name: str) -> None:
    pickle, fid = EDM2_PINS[name]
    r = load_recipe(name)
    assert r.paper_before.fid == fid
    assert r.paper_before.checkpoint == f"{EDM2_ROOT}/posthoc-reconstructions/{pickle}"
    assert r.paper_before.reference == f"{EDM2_ROOT}/dataset-refs/img512.pkl"
    assert r.paper_after.reference == "sp12138sp/UCGM buffers/refs/in1k512_fid_ref.npz"
    assert r.checkpoint is None and pickle in recipe_text(name)
    result = CliRunner().invoke(app, ["recipes", "show", name], env={"COLUMNS": "500"})
    assert result.exit_code == 0 and f"checkpoint {EDM2_ROOT}/posthoc-reconstructions/{pickle}" in result.stdout
