"""All six reference transports, UCGM-S and UCGM-T against golden values of the reference's own code.

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

FIXTURE = Path(__file__).parent / "fixtures" / "transports" / "reference.safetensors"
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


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE))


class TinyNet(torch.nn.Module):
    """The fixture script's network: F = 1.5 tanh(W x + a t + E[y]) + b x over the two channels."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key in ("w", "a", "b", "emb"):
            setattr(self, key, torch.nn.Parameter(state[f"net/{key}"].clone()))

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
    net = TinyNet(ref)
    obj = uc.UCGMObjective(transport=name, num_classes=NUM_CLASSES, **OBJECTIVES[setting])
    loss = obj(net, ref["loss/x"], ref["loss/y"], t=ref["loss/t"], z=ref["loss/z"])
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref[f"loss/{name}/{setting}"], rtol=3e-6, atol=1e-7)
    for pname, p in net.named_parameters():
        torch.testing.assert_close(p.grad, ref[f"grad/{name}/{setting}/{pname}"], rtol=1e-5, atol=1e-6,
                                   msg=f"{name} {setting} d/d{pname}")
