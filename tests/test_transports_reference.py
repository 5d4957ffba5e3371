"""All six reference transports, UCGM-S and UCGM-T against golden values of the reference's own code.

tests/fixtures/enhanced/reference.safetensors is written by scripts/fixtures/make_enhanced.py the same way
from the author's fork cccvs/UCGM@0b5e768 (methodes/unigen.py, whose objective has `enhanced_style`), with
a second TinyNet (seed 12) as the target network: training_step losses and gradients for each style. The
fork trains ReLinear in the frame with noise at s = 1 (our frame "noise-at-1").

tests/fixtures/transports/reference.safetensors is written by scripts/fixtures/make_transports.py, which
imports LINs-lab/UCGM's methods/transports and methods/unigen.py from a checkout and runs them on CPU: the
coefficients at fixed times, `uni_sample` trajectories of a tiny closed-form network and `training_step`
losses and gradients at fixed t and z. Nothing here is computed by the reference at test time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ucgm_convert as uc
from ucgm_convert.recipe import load_recipe

FIXTURE = Path(__file__).parent / "fixtures" / "transports" / "reference.safetensors"
ENHANCED = Path(__file__).parent / "fixtures" / "enhanced" / "reference.safetensors"
NAMES = ("Linear", "ReLinear", "TrigFlow", "EDM", "TrigLinear", "Random")
NUM_CLASSES = 3
SAMPLERS = {  # the fixture script's uni_sample settings, in our keyword names
    "euler": dict(steps=6, order=1, stochasticity=0.0, extrapolation=0.0, time_dist=(1.0, 1.0, 1.0),
                  gaps=(0.0, 0.001)),
    "heun_extrapolated": dict(steps=9, order=2, stochasticity=0.0, extrapolation=0.4,
                              time_dist=(1.17, 0.8, 1.1), gaps=(0.002, 0.005)),
    "stochastic_end_gap_0": dict(steps=5, order=1, stochasticity=0.4, extrapolation=0.0,
                                 time_dist=(1.0, 1.0, 1.0), gaps=(0.001, 0.0)),
}
OBJECTIVES = {  # the fixture script's UCGMTS settings, in our keyword names
    "plain": dict(label_drop=0.25),
    "enhanced_cosine": dict(enhanced=0.6, label_drop=0.25, huber_eps=0.03, cosine_loss=True, weighting="Cosine"),
    "consistency_1": dict(consistency=1.0, label_drop=0.25, huber_eps=0.1),
    "consistency_half_enhanced": dict(consistency=0.5, enhanced=1.5, label_drop=0.25, huber_eps=0.1,
                                      weighting="Cosine"),
}

_TUNED = dict(consistency=1.0, weighting="Cosine")
STYLES = {  # make_enhanced.py's UCGMTS settings (cccvs/UCGM), in our keyword names
    "fc_vs_fe_published": dict(_TUNED, label_drop=0.1, enhanced=2.5, enhanced_style="fc-vs-fe", huber_eps=5.0),
    "fc_vs_fe_consistency_1": dict(_TUNED, label_drop=0.25, enhanced=3.0, enhanced_style="fc-vs-fe",
                                   huber_eps=0.1),
    "fc_vs_fe_consistency_half": dict(_TUNED, consistency=0.5, label_drop=0.25, enhanced=1.9,
                                      enhanced_style="fc-vs-fe", huber_eps=0.1),
    "fc_vs_fe_consistency_0": dict(label_drop=0.25, enhanced=0.6, enhanced_style="fc-vs-fe", huber_eps=0.03),
    "fc_vs_xz_consistency_1": dict(_TUNED, label_drop=0.25, enhanced=2.0, enhanced_style="fc-vs-xz",
                                   huber_eps=0.1),
    "ft_vs_fe_consistency_0": dict(label_drop=0.25, enhanced=0.6, enhanced_style="ft-vs-fe", cosine_loss=True,
                                   weighting="Cosine"),
    "ft_vs_fe_consistency_1": dict(_TUNED, label_drop=0.25, enhanced=1.5, enhanced_style="ft-vs-fe",
                                   huber_eps=0.1),
}
# the recipes whose tuning section is cccvs/UCGM@0b5e768's configs/tuning_few_steps file
PUBLISHED = {"repa-e": (2.5, 5.0), "lightningdit": (3.0, 5.0), "ddt-256": (1.9, 5.0), "repa": (1.7, 5.0)}


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE))


class TinyNet(torch.nn.Module):
    """The fixture script's network: F = 1.5 tanh(W x + a t + E[y]) + b x over the two channels."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str = "net") -> None:
        super().__init__()
        for key in ("w", "a", "b", "emb"):
            setattr(self, key, torch.nn.Parameter(state[f"{prefix}/{key}"].clone()))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("oc,bchw->bohw", self.w, x) + self.a.view(1, 2, 1, 1) * t.view(-1, 1, 1, 1)
        return 1.5 * torch.tanh(h + self.emb[y].view(-1, 2, 1, 1)) + self.b.view(1, 2, 1, 1) * x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_coefficients_equal_the_references(ref, name, dtype):
    t = ref[f"times/{dtype}"]
    T = uc.get_transport(name)
    for fn in ("alpha_in", "gamma_in", "alpha_to", "gamma_to"):
        ours = getattr(T, fn)(t)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, ref[f"coef/{name}/{fn}/{dtype}"], rtol=0, atol=0, msg=f"{name}.{fn}")


@pytest.mark.parametrize("setting", SAMPLERS)
@pytest.mark.parametrize("name", NAMES)
def test_sampler_trajectory_equals_the_references(ref, name, setting):
    """Same noise, same global seed for the stochastic draws: the whole trajectory agrees."""
    net = TinyNet(ref)
    torch.manual_seed(123)
    with torch.no_grad():
        traj = uc.sample(net, ref["sample/noise"], transport=name, return_trajectory=True, y=ref["sample/y"],
                         **SAMPLERS[setting])
    assert not traj.isnan().any()
    torch.testing.assert_close(traj, ref[f"sample/{name}/{setting}"], rtol=0, atol=0)


@pytest.mark.parametrize("setting", OBJECTIVES)
@pytest.mark.parametrize("name", NAMES)
def test_loss_and_gradients_equal_the_references(ref, name, setting):
    assert_matches_reference(ref, name, setting, OBJECTIVES[setting])


def assert_matches_reference(ref: dict[str, torch.Tensor], name: str, setting: str, kwargs: dict,
                             teacher: torch.nn.Module | None = None) -> None:
    """Our loss and student gradients for `kwargs` equal the fixture's, to float32 round-off."""
    net = TinyNet(ref)
    obj = uc.UCGMObjective(transport=name, num_classes=NUM_CLASSES, **kwargs)
    loss = obj(net, ref["loss/x"], ref["loss/y"], teacher=teacher, t=ref["loss/t"], z=ref["loss/z"])
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref[f"loss/{name}/{setting}"], rtol=3e-6, atol=1e-7)
    for pname, p in net.named_parameters():
        torch.testing.assert_close(p.grad, ref[f"grad/{name}/{setting}/{pname}"], rtol=1e-5, atol=1e-6,
                                   msg=f"{name} {setting} d/d{pname}")


@pytest.fixture(scope="module")
def enhanced_ref() -> dict[str, torch.Tensor]:
    return load_file(str(ENHANCED))


@pytest.mark.parametrize("setting", STYLES)
@pytest.mark.parametrize("name", NAMES)
def test_enhanced_styles_equal_the_author_fork(enhanced_ref, name, setting):
    """Each enhanced_style, with a teacher that differs from the student, as cccvs/UCGM's training_step;
    frame noise-at-1 is its time frame (ReLinear trained at s = 1 - t; a no-op for the other transports)."""
    teacher = TinyNet(enhanced_ref, "teacher").requires_grad_(False)
    assert_matches_reference(enhanced_ref, name, setting, {**STYLES[setting], "frame": "noise-at-1"}, teacher=teacher)


def test_the_styles_differ_so_the_fixture_tells_them_apart(enhanced_ref):
    for name in NAMES:
        losses = {round(float(enhanced_ref[f"loss/{name}/{s}"]), 5) for s in STYLES}
        assert len(losses) == len(STYLES), name


@pytest.mark.parametrize("setting", STYLES)
def test_relinear_in_its_own_frame_is_not_the_fork(enhanced_ref, setting):
    """LINs-lab/UCGM (and frame "transport") trains ReLinear at its own t (noise at t = 0); the fork does not."""
    net, teacher = TinyNet(enhanced_ref), TinyNet(enhanced_ref, "teacher").requires_grad_(False)
    obj = uc.UCGMObjective(transport="ReLinear", num_classes=NUM_CLASSES, **STYLES[setting])
    loss = obj(net, enhanced_ref["loss/x"], enhanced_ref["loss/y"], teacher=teacher, t=enhanced_ref["loss/t"],
               z=enhanced_ref["loss/z"])
    assert abs(loss.item() - enhanced_ref[f"loss/ReLinear/{setting}"].item()) > 1e-3


@pytest.mark.parametrize("recipe", PUBLISHED)
def test_published_recipes_objective_is_the_author_tuning_objective(enhanced_ref, recipe):
    """Each recipe's tuning objective is its fork tuning file's transport: section in the fork's frame
    (fc_vs_fe_published is REPA-E's; the four files differ only in the ratio): on the recipe's own transport,
    at REPA-E's ratio, it gives the fork's loss and gradients."""
    r = load_recipe(recipe)
    enhanced, huber = PUBLISHED[recipe]
    assert (r.tuning.enhanced_style, r.tuning.enhanced, r.tuning.huber_eps) == ("fc-vs-fe", enhanced, huber)
    kwargs = {k: v for k, v in r.tuning.objective_kwargs().items() if k != "time_dist"}
    assert kwargs == {**STYLES["fc_vs_fe_published"], "enhanced": enhanced, "enhanced_range": (0.0, 0.75),
                      "cosine_loss": False, "frame": "noise-at-1"}
    teacher = TinyNet(enhanced_ref, "teacher").requires_grad_(False)
    assert_matches_reference(enhanced_ref, r.transport, "fc_vs_fe_published", {**kwargs, "enhanced": 2.5},
                             teacher=teacher)
