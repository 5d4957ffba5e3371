"""UCGM-T objective (uc.UCGMObjective) checked against independent hand computations.

Everything here is written from the math of the reference `training_step` (LINs-lab/UCGM,
methods/unigen.py; shared/reference/ucgm-method.md, section UCGM-T), not from our code:
the transport coefficients, the enhanced targets, the finite differences and the loss
reductions are re-derived below in plain torch. Documented differences of ours that the
hand computation follows: label_drop with round(p*B) == 0 drops nothing; the consistency
branch's two extra evaluations run as one batched no-grad forward of the online model; the
CPU RNG state is replayed before each extra forward (so dropout masks repeat).

Most comparisons run in float64 so that agreement can be demanded to ~1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ucgm_convert as uc

NC = 5  # number of classes; the null class is NC
SHAPE = (2, 4, 4)
HP = 1.57  # the reference's "pi / 2"


# --------------------------------------------------------------------------------------------
# Independent transport coefficients (alpha_in, gamma_in, alpha_to, gamma_to)
# --------------------------------------------------------------------------------------------


def _edm(t):
    s = torch.exp(4 * (2.68 * t - 1.59))
    n = torch.sqrt(s**2 + 0.25)
    return s / n, 1 / n, -0.5 / n, 2 * s / n


COEF = {
    "Linear": lambda t: (t, 1 - t, torch.ones_like(t), -torch.ones_like(t)),
    "ReLinear": lambda t: (1 - t, t, -torch.ones_like(t), torch.ones_like(t)),
    "TrigFlow": lambda t: (
        torch.sin(HP * t),
        torch.cos(HP * t),
        torch.cos(HP * t),
        -torch.sin(HP * t),
    ),
    "EDM": _edm,
}


def _col(t, ndim):
    """t [B] -> [B, 1, ..., 1] for broadcasting against a tensor of `ndim` dims."""
    return t.reshape((-1,) + (1,) * (ndim - 1))


def x_hat_of(tr, f, x_in, t):
    ai, gi, ao, go = COEF[tr](t)
    return (f * ai - x_in * ao) / (ai * go - gi * ao)


def z_hat_of(tr, f, x_in, t):
    ai, gi, ao, go = COEF[tr](t)
    return (x_in * go - f * gi) / (ai * go - gi * ao)


# --------------------------------------------------------------------------------------------
# Tiny networks
# --------------------------------------------------------------------------------------------


class Net(nn.Module):
    """F(x_t, t, y): Linear layers + a label embedding with NC + 1 rows; records every call."""

    def __init__(self, seed=0, shape=SHAPE, hidden=24, p_drop=0.0, gain=0.3):
        super().__init__()
        dim = math.prod(shape)
        self.num_classes = NC
        self.emb = nn.Embedding(NC + 1, hidden)
        self.inp = nn.Linear(dim + 1, hidden)
        self.out = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(p_drop)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * gain)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(
            {
                "batch": x.shape[0],
                "y": y.detach().clone(),
                "t": t.detach().clone(),
                "grad": torch.is_grad_enabled(),
            }
        )
        assert t.shape == (x.shape[0],), "the model must be called with t of shape [B]"
        h = self.inp(torch.cat([x.flatten(1), t.to(x)[:, None]], dim=1)) + self.emb(y)
        h = self.drop(torch.tanh(h))
        return self.out(h).view_as(x)


def make_data(batch=8, shape=SHAPE, seed=1, dtype=torch.float64, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn((batch, *shape), generator=gen) * scale).to(dtype)
    z = (torch.randn((batch, *shape), generator=gen) * scale).to(dtype)
    y = torch.randint(0, NC, (batch,), generator=gen)
    return x, y, z


# t values that straddle the default enhanced range (0, 0.75) and keep t +- fd_eps in (0, 1)
T8 = torch.tensor([0.30, 0.55, 0.80, 0.92, 0.62, 0.21, 0.74, 0.86], dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# The hand computation of the reference training_step, with injected t and z
# --------------------------------------------------------------------------------------------


def hand_prediction_and_target(
    model,
    x,
    y,
    t,
    z,
    *,
    teacher=None,
    transport="Linear",
    cor=0.0,
    enr=0.0,
    lo=0.0,
    hi=0.75,
    label_drop=0.1,
    fd_eps=0.005,
    detach_target=True,
    replay=True,
    batched=True,
    stats=None,
):
    """F_t (with grad) and the target, following ucgm-method.md UCGM-T steps 2-4.

    `enr` is the EFFECTIVE enhance ratio (after the constructor's (r-1)/r rescale).
    """
    B, nd = x.shape[0], x.ndim
    tb = _col(t, nd)
    ai, gi, ao, go = COEF[transport](tb)
    dent = ai * go - gi * ao

    ndrop = round(label_drop * B)
    labels = y.clone()
    if ndrop > 0:
        labels[B - ndrop :] = NC

    x_t = ai * z + gi * x
    rng = torch.get_rng_state()
    f_t = model(x_t, t, labels)

    def restore():
        if replay:
            torch.set_rng_state(rng)

    ctx = torch.no_grad() if detach_target else torch.enable_grad()
    with ctx:
        f_d = f_t.detach() if detach_target else f_t
        x_tar, z_tar = x.clone(), z.clone()
        target = ao * z_tar + go * x_tar
        if cor != 0.0 or enr != 0.0:
            inside = (t > lo) & (t < hi)

            def enhance(T, p_c, p_u):
                rows = []
                for i in range(B):
                    if i >= B - ndrop:
                        rows.append((T[i] + p_u[i]) / 2)
                    elif bool(inside[i]):
                        rows.append(T[i] + enr * (p_c[i] - p_u[i]))
                    else:
                        rows.append((T[i] + p_c[i]) / 2)
                return torch.stack(rows)

            if enr != 0.0 and cor == 0.0:
                net = model if teacher is None else teacher
                restore()
                f_u = net(x_t, t, torch.full_like(labels, NC))
                xc, zc = x_hat_of(transport, f_d, x_t, tb), z_hat_of(transport, f_d, x_t, tb)
                xu, zu = x_hat_of(transport, f_u, x_t, tb), z_hat_of(transport, f_u, x_t, tb)
                x_tar, z_tar = enhance(x_tar, xc, xu), enhance(z_tar, zc, zu)
                target = ao * z_tar + go * x_tar
            if enr != 0.0 and cor != 0.0:
                net = model if teacher is None else teacher
                restore()
                f_m = net(x_t, t, labels)
                xm, zm = x_hat_of(transport, f_m, x_t, tb), z_hat_of(transport, f_m, x_t, tb)
                x_tar, z_tar = enhance(x_tar, xm, x_tar), enhance(z_tar, zm, z_tar)
                target = ao * z_tar + go * x_tar
            if cor != 0.0:

                def online_x_hat(times):
                    """x_hat of the online model at x_r for each r in `times`: one batched call
                    (ours), or one call per time with the RNG replayed before each (reference)."""
                    xs = []
                    for r in times:
                        a_r, g_r, _, _ = COEF[transport](r)
                        xs.append(a_r * z_tar + g_r * x_tar)
                    if not batched:
                        out = []
                        for x_r, r in zip(xs, times):
                            restore()
                            out.append(x_hat_of(transport, model(x_r, r.flatten(), labels), x_r, r))
                        return out
                    x_in = torch.cat(xs)
                    r_in = torch.cat(times)
                    restore()
                    f_r = model(x_in, r_in.flatten(), labels.repeat(len(times)))
                    return x_hat_of(transport, f_r, x_in, r_in).chunk(len(times))

                if cor == 1.0:
                    y_p, y_m = online_x_hat([tb + fd_eps, tb - fd_eps])
                    d = (y_p - y_m) / (2 * fd_eps)
                else:
                    e = (1 - cor) * tb
                    x_t2 = ai * z_tar + gi * x_tar
                    x_hat_t = (f_d * ai - x_t2 * ao) / dent
                    (y_b,) = online_x_hat([tb - e])
                    d = (x_hat_t - y_b) / e
                if stats is not None:
                    stats["clamped"] = float((d.abs() > 1).double().mean())
                d = torch.clamp(d, -1.0, 1.0)
                w = 4 / torch.sin(HP * tb)
                target = f_d - ai / dent * w * d
    return f_t, target, labels


def hand_reduce(f, target, t, huber=0.0, cosine=False, weighting=None):
    """Per-sample pseudo-Huber (+ cosine term), optional cos(1.57 t) weight, batch mean."""
    B = f.shape[0]
    per = torch.sqrt(((f - target) ** 2).reshape(B, -1).mean(dim=1) + huber**2) - huber
    if cosine:
        dot = (f * target).sum(dim=1)
        cos = dot / (f.norm(dim=1) * target.norm(dim=1))
        per = per + (1 - cos).reshape(B, -1).mean(dim=1)
    if weighting == "Cosine":
        per = per * torch.cos(HP * t)
    return per.mean()


def hand_loss(model, x, y, t, z, *, huber=0.0, cosine=False, weighting=None, **kw):
    f, target, _ = hand_prediction_and_target(model, x, y, t, z, **kw)
    return hand_reduce(f, target, t, huber, cosine, weighting)


def grads(loss, module):
    return torch.autograd.grad(loss, list(module.parameters()), allow_unused=True)


def assert_grads_close(g1, g2, rtol=1e-9, atol=1e-11):
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def objective(**kw):
    kw.setdefault("num_classes", NC)
    return uc.UCGMObjective(**kw)


# --------------------------------------------------------------------------------------------
# Plain (flow matching) branch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["Linear", "ReLinear", "TrigFlow", "EDM"])
def test_plain_oracle_model_has_zero_loss(transport):
    """A model that outputs exactly alpha_to(t) z + gamma_to(t) x has loss 0; a perturbed one > 0."""
    x, y, z = make_data(dtype=torch.float32)
    t = T8.float()
    for shift in (0.0, 0.05):

        def oracle(x_t, tt, labels):
            _, _, ao, go = COEF[transport](_col(tt, x.ndim))
            return ao * z + go * x + shift

        obj = objective(transport=transport, label_drop=0.25)
        loss = obj(oracle, x, y, t=t, z=z)
        assert loss.ndim == 0
        if shift == 0.0:
            assert abs(loss.item()) < 1e-6
        else:
            assert loss.item() > 1e-3
            # constant shift: sqrt(mean(shift^2)) per sample
            assert loss.item() == pytest.approx(shift, rel=1e-4)


@pytest.mark.parametrize("transport", ["Linear", "ReLinear", "TrigFlow", "EDM"])
def test_plain_loss_and_gradient_match_hand_computation(transport):
    model = Net().double()
    x, y, z = make_data()
    obj = objective(transport=transport, label_drop=0.25)
    loss = obj(model, x, y, t=T8, z=z)
    ref = hand_loss(model, x, y, T8, z, transport=transport, label_drop=0.25)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads(loss, model), grads(ref, model))
    assert loss.item() > 0


def test_plain_branch_calls_model_once_with_grad():
    model, teacher = Net().double(), Net(seed=7).double()
    x, y, z = make_data()
    objective(label_drop=0.25)(model, x, y, teacher=teacher, t=T8, z=z)
    assert [c["batch"] for c in model.calls] == [8]
    assert model.calls[0]["grad"]
    torch.testing.assert_close(model.calls[0]["t"], T8)
    assert teacher.calls == []


def test_t_and_z_drawn_as_the_reference_when_not_given():
    """t ~ clamp(Beta(a, b) * s, 0, 1) drawn first, then z ~ N(0, I), from the global RNG."""
    model = Net().double()
    x, y, _ = make_data()
    a, b, s = 0.8, 1.2, 1.1
    obj = objective(time_dist=(a, b, s), label_drop=0.25)
    torch.manual_seed(123)
    loss = obj(model, x, y)
    torch.manual_seed(123)
    t = torch.distributions.Beta(a, b).sample([x.shape[0], 1, 1, 1]).to(x)
    t = torch.clamp(t * s, 0, 1).flatten()
    z = torch.randn_like(x)
    ref = hand_loss(model, x, y, t, z, label_drop=0.25)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(model.calls[0]["t"], t, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Loss shape: pseudo-Huber, cosine term, Cosine weighting
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("huber", [0.0, 0.3, 5.0])
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("weighting", [None, "Cosine"])
def test_loss_reductions_match_hand_computation(huber, cosine, weighting):
    model = Net().double()
    x, y, z = make_data()
    obj = objective(huber_eps=huber, cosine_loss=cosine, weighting=weighting, label_drop=0.25)
    loss = obj(model, x, y, t=T8, z=z)
    ref = hand_loss(model, x, y, T8, z, huber=huber, cosine=cosine, weighting=weighting, label_drop=0.25)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads(loss, model), grads(ref, model))


def test_pseudo_huber_per_sample_formula_by_constant_offsets():
    """Per-sample offsets k_i give sqrt(k_i^2 + c^2) - c, averaged (weighted) over the batch."""
    x, y, z = make_data(dtype=torch.float64)
    t = T8
    k = torch.linspace(0.1, 0.8, 8, dtype=torch.float64)
    tr = uc.get_transport("Linear")

    def model(x_t, tt, labels):
        return tr.target(x, z, _col(tt, x.ndim)) + _col(k, x.ndim)

    c = 0.5
    loss = objective(huber_eps=c)(model, x, y, t=t, z=z)
    expected = (torch.sqrt(k**2 + c**2) - c).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    loss_w = objective(huber_eps=c, weighting="Cosine")(model, x, y, t=t, z=z)
    expected_w = ((torch.sqrt(k**2 + c**2) - c) * torch.cos(1.57 * t)).mean()
    torch.testing.assert_close(loss_w, expected_w, rtol=1e-10, atol=1e-12)
    # a large eps makes it ~ mean(k^2) / (2c)
    big = 1e4
    loss_big = objective(huber_eps=big)(model, x, y, t=t, z=z)
    assert loss_big.item() == pytest.approx((k**2).mean().item() / (2 * big), rel=1e-3)


def test_cosine_term_is_mean_over_positions_of_one_minus_channel_cosine():
    """F = target * per-position positive factor: MSE part known, cosine part exactly 0;
    F = -target: cosine part exactly 2 at every position."""
    x, y, z = make_data(dtype=torch.float64)
    tr = uc.get_transport("Linear")

    def scaled(x_t, tt, labels):
        return tr.target(x, z, _col(tt, x.ndim)) * 2.0

    def flipped(x_t, tt, labels):
        return -tr.target(x, z, _col(tt, x.ndim))

    obj_cos = objective(cosine_loss=True)
    obj_plain = objective(cosine_loss=False)
    torch.testing.assert_close(
        obj_cos(scaled, x, y, t=T8, z=z), obj_plain(scaled, x, y, t=T8, z=z), rtol=1e-9, atol=1e-12
    )
    diff = obj_cos(flipped, x, y, t=T8, z=z) - obj_plain(flipped, x, y, t=T8, z=z)
    assert diff.item() == pytest.approx(2.0, abs=1e-9)
    # channels along dim 1 only: swapping the two channels of the prediction changes it
    def swapped(x_t, tt, labels):
        return tr.target(x, z, _col(tt, x.ndim)).flip(1)

    target = tr.target(x, z, _col(T8, x.ndim))
    f = target.flip(1)
    cos = (f * target).sum(1) / (f.norm(dim=1) * target.norm(dim=1))
    expected_term = (1 - cos).mean(dim=(1, 2)).mean()
    diff = obj_cos(swapped, x, y, t=T8, z=z) - obj_plain(swapped, x, y, t=T8, z=z)
    torch.testing.assert_close(diff, expected_term, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Label drop
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch,p,ndrop",
    [(8, 0.25, 2), (8, 0.1, 1), (4, 0.1, 0), (5, 0.5, 2), (5, 0.3, 2), (5, 0.7, 4), (6, 1.0, 6), (6, 0.0, 0)],
)
def test_label_drop_last_round_p_b_labels_become_null(batch, p, ndrop):
    model = Net().double()
    x, _, z = make_data(batch=batch)
    y = torch.arange(batch) % NC
    y_before = y.clone()
    obj = objective(label_drop=p)
    assert obj.num_dropped(batch) == ndrop
    obj(model, x, y, t=torch.full((batch,), 0.5, dtype=torch.float64), z=z)
    seen = model.calls[0]["y"]
    expected = y_before.clone()
    expected[batch - ndrop :] = NC
    if ndrop == 0:
        expected = y_before
    assert torch.equal(seen, expected)
    assert torch.equal(y, y_before), "the caller's labels must not be modified in place"


# --------------------------------------------------------------------------------------------
# Consistency branch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["Linear", "ReLinear", "TrigFlow", "EDM"])
@pytest.mark.parametrize("fd_eps", [0.005, 0.02])
def test_consistency_one_matches_central_difference(transport, fd_eps):
    model = Net().double()
    x, y, z = make_data()
    obj = objective(transport=transport, consistency=1.0, label_drop=0.25, fd_eps=fd_eps, huber_eps=0.2)
    loss = obj(model, x, y, t=T8, z=z)
    model.calls.clear()
    stats = {}
    ref = hand_loss(
        model, x, y, T8, z, transport=transport, cor=1.0, label_drop=0.25, fd_eps=fd_eps, huber=0.2, stats=stats
    )
    torch.testing.assert_close(loss, ref, rtol=1e-8, atol=1e-10)
    assert_grads_close(grads(loss, model), grads(ref, model), rtol=1e-7, atol=1e-9)
    assert loss.item() > 0
    assert 0.0 < stats["clamped"] < 1.0, "the data should clamp some derivative entries, not all"


def test_consistency_one_exercises_the_clamp_and_differs_from_plain():
    model = Net().double()
    x, y, z = make_data()
    stats = {}
    hand_loss(model, x, y, T8, z, cor=1.0, label_drop=0.25, stats=stats)
    assert 0.0 < stats["clamped"] < 1.0, "test data should clamp some derivative entries, not all"
    plain = objective(label_drop=0.25)(model, x, y, t=T8, z=z)
    cons = objective(consistency=1.0, label_drop=0.25)(model, x, y, t=T8, z=z)
    assert abs(plain.item() - cons.item()) > 1e-4


def test_consistency_one_oracle_flow_is_a_fixed_point():
    """If F is the exact transport target at every (x_r, r), x_hat(r) = x for all r: d = 0, loss 0.
    A model that is not exact gets a loss > 0."""
    x, y, z = make_data()
    B = x.shape[0]
    for transport in ("Linear", "TrigFlow"):
        for shift in (0.0, 0.05):

            def oracle(x_in, tt, labels):
                reps = x_in.shape[0] // B
                _, _, ao, go = COEF[transport](_col(tt, x.ndim))
                return ao * z.repeat(reps, 1, 1, 1) + go * x.repeat(reps, 1, 1, 1) + shift * tt.reshape(-1, 1, 1, 1)

            loss = objective(transport=transport, consistency=1.0)(oracle, x, y, t=T8, z=z)
            if shift == 0.0:
                assert abs(loss.item()) < 1e-9
            else:
                assert loss.item() > 1e-4


def test_consistency_one_uses_one_batched_no_grad_forward_of_the_online_model():
    model, teacher = Net().double(), Net(seed=7).double()
    x, y, z = make_data()
    eps = 0.005
    objective(consistency=1.0, label_drop=0.25, fd_eps=eps)(model, x, y, teacher=teacher, t=T8, z=z)
    assert teacher.calls == [], "with enhanced = 0 the consistency target uses the online model only"
    assert [c["batch"] for c in model.calls] == [8, 16]
    assert model.calls[0]["grad"] and not model.calls[1]["grad"]
    dropped = y.clone()
    dropped[-2:] = NC
    assert torch.equal(model.calls[1]["y"], dropped.repeat(2))
    times = model.calls[1]["t"]
    expected = torch.cat([T8 + eps, T8 - eps])
    torch.testing.assert_close(times.sort().values, expected.sort().values)
    # the two halves are consistent: each half is all-plus or all-minus
    halves = times.chunk(2)
    assert {tuple(h.tolist()) for h in halves} == {tuple((T8 + eps).tolist()), tuple((T8 - eps).tolist())}


@pytest.mark.parametrize("transport", ["Linear", "ReLinear", "TrigFlow"])
@pytest.mark.parametrize("cor", [0.25, 0.5, 0.9])
def test_consistency_fraction_matches_backward_difference(transport, cor):
    model = Net().double()
    x, y, z = make_data()
    obj = objective(transport=transport, consistency=cor, label_drop=0.25)
    loss = obj(model, x, y, t=T8, z=z)
    # the one extra forward is at t - (1 - cor) t = cor * t
    assert [c["batch"] for c in model.calls] == [8, 8]
    torch.testing.assert_close(model.calls[1]["t"], T8 - (1 - cor) * T8)
    assert not model.calls[1]["grad"]
    ref = hand_loss(model, x, y, T8, z, transport=transport, cor=cor, label_drop=0.25)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-11)
    assert_grads_close(grads(loss, model), grads(ref, model), rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Enhanced targets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given,cor,effective",
    [(0.5, 0.0, 0.5), (1.5, 0.0, 1.0 / 3.0), (2.0, 0.0, 0.5), (1.0, 0.0, 0.0), (1.5, 1.0, 1.5), (1.3, 0.5, 1.3)],
)
def test_enhanced_ratio_rescale_at_construction(given, cor, effective):
    obj = objective(enhanced=given, consistency=cor)
    assert obj.enhanced == pytest.approx(effective, abs=1e-12)


def test_enhanced_without_teacher_uses_model_unconditionally():
    """cor = 0, teacher None: P_c = online x/z_hat, P_u = the model itself with every label null."""
    model = Net().double()
    x, y, z = make_data()
    obj = objective(enhanced=1.5, label_drop=0.25)  # effective ratio 1/3
    loss = obj(model, x, y, t=T8, z=z)
    assert [c["batch"] for c in model.calls] == [8, 8]
    assert torch.equal(model.calls[1]["y"], torch.full((8,), NC))
    assert not model.calls[1]["grad"]
    ref = hand_loss(model, x, y, T8, z, enr=1.0 / 3.0, label_drop=0.25)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads(loss, model), grads(ref, model))
    # the rescale matters: the unrescaled ratio gives another loss
    wrong = hand_loss(model, x, y, T8, z, enr=1.5, label_drop=0.25)
    assert abs(wrong.item() - loss.item()) > 1e-6
    plain = objective(label_drop=0.25)(model, x, y, t=T8, z=z)
    assert abs(plain.item() - loss.item()) > 1e-6


@pytest.mark.parametrize("transport", ["Linear", "TrigFlow"])
def test_enhanced_with_teacher_cor_zero(transport):
    model, teacher = Net().double(), Net(seed=7).double()
    x, y, z = make_data()
    obj = objective(transport=transport, enhanced=0.6, label_drop=0.25)
    loss = obj(model, x, y, teacher=teacher, t=T8, z=z)
    assert [c["batch"] for c in model.calls] == [8]
    assert [c["batch"] for c in teacher.calls] == [8]
    assert torch.equal(teacher.calls[0]["y"], torch.full((8,), NC))
    ref = hand_loss(model, x, y, T8, z, teacher=teacher, transport=transport, enr=0.6, label_drop=0.25)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads(loss, model), grads(ref, model))


@pytest.mark.parametrize("transport", ["Linear", "ReLinear", "TrigFlow"])
@pytest.mark.parametrize("cor", [1.0, 0.5])
def test_enhanced_with_teacher_and_consistency(transport, cor):
    """Teacher's conditional prediction enhances x/z; the consistency target is then taken at
    the enhanced x_tar/z_tar with the online model."""
    model, teacher = Net().double(), Net(seed=7).double()
    x, y, z = make_data()
    obj = objective(transport=transport, consistency=cor, enhanced=1.7, label_drop=0.25)
    assert obj.enhanced == 1.7
    loss = obj(model, x, y, teacher=teacher, t=T8, z=z)
    dropped = y.clone()
    dropped[-2:] = NC
    assert [c["batch"] for c in teacher.calls] == [8]
    assert torch.equal(teacher.calls[0]["y"], dropped), "teacher is conditional, dropped labels as they are"
    assert [c["batch"] for c in model.calls] == ([8, 16] if cor == 1.0 else [8, 8])
    ref = hand_loss(model, x, y, T8, z, teacher=teacher, transport=transport, cor=cor, enr=1.7, label_drop=0.25)
    torch.testing.assert_close(loss, ref, rtol=1e-8, atol=1e-10)
    assert_grads_close(grads(loss, model), grads(ref, model), rtol=1e-7, atol=1e-9)
    # enhancement changes the consistency target (the x_r points move)
    unenhanced = objective(transport=transport, consistency=cor, label_drop=0.25)(model, x, y, t=T8, z=z)
    assert abs(unenhanced.item() - loss.item()) > 1e-6


def test_enhanced_and_consistency_without_teacher_uses_the_model_as_teacher():
    model = Net().double()
    x, y, z = make_data()
    loss = objective(consistency=1.0, enhanced=1.5, label_drop=0.25)(model, x, y, t=T8, z=z)
    assert [c["batch"] for c in model.calls] == [8, 8, 16]
    ref = hand_loss(model, x, y, T8, z, cor=1.0, enr=1.5, label_drop=0.25)
    torch.testing.assert_close(loss, ref, rtol=1e-8, atol=1e-10)


def test_enhanced_time_range_is_strict_and_rows_follow_their_rule():
    """Rows with lo < t < hi: T + r (P_c - P_u); other kept rows: (T + P_c)/2; the last ndrop
    rows: (T + P_u)/2. Rows exactly at lo or hi are outside."""
    model, teacher = Net().double(), Net(seed=7).double()
    x, y, z = make_data()
    lo, hi = 0.25, 0.625  # exactly representable
    t = torch.tensor([0.10, 0.25, 0.40, 0.625, 0.80, 0.50, 0.30, 0.60], dtype=torch.float64)
    obj = objective(enhanced=0.8, enhanced_range=(lo, hi), label_drop=0.25)
    loss = obj(model, x, y, teacher=teacher, t=t, z=z)
    ref = hand_loss(model, x, y, t, z, teacher=teacher, enr=0.8, lo=lo, hi=hi, label_drop=0.25)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads(loss, model), grads(ref, model))
    # each rule is observable: inclusive bounds, no range, or no drop rule all give other losses
    for kw in (
        dict(lo=lo - 1e-9, hi=hi + 1e-9),  # boundary rows counted as inside
        dict(lo=-1.0, hi=2.0),  # everything inside
        dict(lo=2.0, hi=3.0),  # everything outside
    ):
        other = hand_loss(model, x, y, t, z, teacher=teacher, enr=0.8, label_drop=0.25, **kw)
        assert abs(other.item() - loss.item()) > 1e-7, kw


def test_enhanced_dropped_rows_use_uncond_average():
    """With label_drop 0 no row gets (T + P_u)/2; with 0.25 the last two do."""
    model, teacher = Net().double(), Net(seed=7).double()
    x, y, z = make_data()
    for p in (0.0, 0.25, 1.0):
        obj = objective(enhanced=0.8, label_drop=p)
        loss = obj(model, x, y, teacher=teacher, t=T8, z=z)
        ref = hand_loss(model, x, y, T8, z, teacher=teacher, enr=0.8, label_drop=p)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Gradients flow only through the online prediction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        dict(consistency=1.0),
        dict(consistency=0.5),
        dict(enhanced=0.6),
        dict(enhanced=0.6, use_teacher=False),
        dict(consistency=1.0, enhanced=1.5),
        dict(consistency=1.0, enhanced=1.5, huber_eps=0.3, weighting="Cosine", cosine_loss=True),
    ],
    ids=["cor1", "cor0.5", "enr-teacher", "enr-self", "cor1-enr", "cor1-enr-all-options"],
)
def test_gradient_only_through_online_prediction(cfg):
    cfg = dict(cfg)
    use_teacher = cfg.pop("use_teacher", True)
    model, teacher = Net().double(), Net(seed=7).double()
    assert all(p.requires_grad for p in teacher.parameters())
    x, y, z = make_data()
    obj = objective(label_drop=0.25, **cfg)
    loss = obj(model, x, y, teacher=teacher if use_teacher else None, t=T8, z=z)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()), "teacher must receive no gradient"
    g_impl = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    kw = dict(
        teacher=teacher if use_teacher else None,
        cor=cfg.get("consistency", 0.0),
        enr=obj.enhanced,
        label_drop=0.25,
        huber=cfg.get("huber_eps", 0.0),
        cosine=cfg.get("cosine_loss", False),
        weighting=cfg.get("weighting"),
    )
    ref = hand_loss(model, x, y, T8, z, **kw)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-8, atol=1e-10)
    assert_grads_close(g_impl, grads(ref, model), rtol=1e-7, atol=1e-9)
    # the test can tell: differentiating through the target gives another gradient
    ref_through = hand_loss(model, x, y, T8, z, detach_target=False, **kw)
    g_through = grads(ref_through, model)
    assert any(
        not torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(g_impl, g_through) if b is not None
    )


# --------------------------------------------------------------------------------------------
# RNG replay before the extra forwards (dropout)
# --------------------------------------------------------------------------------------------


def test_dropout_mask_replayed_for_unconditional_forward():
    model = Net(p_drop=0.5).double().train()
    x, y, z = make_data()
    obj = objective(enhanced=0.6, label_drop=0.25)
    torch.manual_seed(5)
    loss = obj(model, x, y, t=T8, z=z)
    torch.manual_seed(5)
    ref = hand_loss(model, x, y, T8, z, enr=0.6, label_drop=0.25)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.manual_seed(5)
    no_replay = hand_loss(model, x, y, T8, z, enr=0.6, label_drop=0.25, replay=False)
    assert abs(no_replay.item() - loss.item()) > 1e-6, "the control must tell replay from no replay"


def test_dropout_rng_replayed_for_backward_difference_forward():
    model = Net(p_drop=0.5).double().train()
    x, y, z = make_data()
    obj = objective(consistency=0.5, label_drop=0.25)
    torch.manual_seed(9)
    loss = obj(model, x, y, t=T8, z=z)
    torch.manual_seed(9)
    ref = hand_loss(model, x, y, T8, z, cor=0.5, label_drop=0.25)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-11)
    torch.manual_seed(9)
    no_replay = hand_loss(model, x, y, T8, z, cor=0.5, label_drop=0.25, replay=False)
    assert abs(no_replay.item() - loss.item()) > 1e-6


def test_dropout_mask_is_the_same_for_both_central_difference_evaluations():
    model = Net(p_drop=0.1).double().train()
    x, y, z = make_data()
    obj = objective(consistency=1.0, label_drop=0.25)
    torch.manual_seed(9)
    loss = obj(model, x, y, t=T8, z=z)
    torch.manual_seed(9)
    ref = hand_loss(model, x, y, T8, z, cor=1.0, label_drop=0.25, batched=False)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Time distribution
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a,b", [(1.0, 1.0), (2.0, 3.0), (0.8, 1.0)])
def test_sample_t_beta_mean(a, b):
    torch.manual_seed(0)
    t = objective(time_dist=(a, b, 1.0)).sample_t(40000)
    assert t.shape == (40000,)
    assert t.min() >= 0 and t.max() <= 1
    assert t.mean().item() == pytest.approx(a / (a + b), abs=0.006)
    var = a * b / ((a + b) ** 2 * (a + b + 1))
    assert t.var().item() == pytest.approx(var, rel=0.05)


def test_sample_t_scale_clamps_at_one():
    torch.manual_seed(0)
    n = 40000
    t = objective(time_dist=(2.0, 3.0, 2.0)).sample_t(n)
    assert t.max().item() == 1.0 and t.min().item() >= 0.0
    # P(2 X >= 1) for X ~ Beta(2, 3) is P(X > 1/2) = 5/16
    assert (t == 1.0).double().mean().item() == pytest.approx(5 / 16, abs=0.01)
    # E[min(2X, 1)] = int_0^1/2 2x * 12 x (1-x)^2 dx + 5/16
    xs = torch.linspace(0, 0.5, 200001, dtype=torch.float64)
    integral = torch.trapezoid(2 * xs * 12 * xs * (1 - xs) ** 2, xs).item()
    assert t.mean().item() == pytest.approx(integral + 5 / 16, abs=0.006)
    # s < 1 squeezes into [0, s]
    t_half = objective(time_dist=(1.0, 1.0, 0.5)).sample_t(n)
    assert t_half.max().item() <= 0.5
    assert t_half.mean().item() == pytest.approx(0.25, abs=0.005)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(consistency=1.5), "consistency"),
        (dict(consistency=-0.1), "consistency"),
        (dict(weighting="foo"), "weighting"),
        (dict(time_dist=(1.0, 0.0, 1.0)), "time_dist"),
        (dict(time_dist=(0.0, 1.0, 1.0)), "time_dist"),
        (dict(time_dist=(1.0, 1.0, 0.0)), "time_dist"),
        (dict(enhanced_range=(0.75, 0.0)), "enhanced_range"),
        (dict(enhanced=-0.5), "enhanced"),
        (dict(label_drop=1.5), "label_drop"),
        (dict(huber_eps=-1.0), "huber_eps"),
        (dict(fd_eps=0.0), "fd_eps"),
        (dict(enhanced_style="fc-vs-zz"), "enhanced_style"),
        (dict(frame="noise-at-0"), "frame"),
    ],
)
def test_bad_constructor_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        objective(**kwargs)


def test_bad_t_or_z_shapes_raise_value_error_naming_them():
    model = Net().double()
    x, y, z = make_data()
    obj = objective()
    with pytest.raises(ValueError, match=r"\bt\b"):
        obj(model, x, y, t=T8[:, None], z=z)
    with pytest.raises(ValueError, match=r"\bt\b"):
        obj(model, x, y, t=T8[:4], z=z)
    with pytest.raises(ValueError, match=r"\bz\b"):
        obj(model, x, y, t=T8, z=z[:, :1])
    with pytest.raises(ValueError, match=r"\bz\b"):
        obj(model, x, y, t=T8, z=z[:4])


# --------------------------------------------------------------------------------------------
# CPU only, inputs untouched
# --------------------------------------------------------------------------------------------


def _forbid(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"torch.cuda.{name} called by the objective")

    return fail


@pytest.mark.parametrize(
    "cfg",
    [dict(), dict(consistency=1.0), dict(consistency=0.5), dict(enhanced=0.6), dict(consistency=1.0, enhanced=1.5)],
)
def test_runs_on_cpu_without_cuda_calls_and_leaves_inputs_untouched(cfg, monkeypatch):
    for name in (
        "get_rng_state",
        "set_rng_state",
        "get_rng_state_all",
        "set_rng_state_all",
        "manual_seed",
        "manual_seed_all",
        "_lazy_init",
        "synchronize",
        "current_device",
        "device_count",
        "is_available",
    ):
        monkeypatch.setattr(torch.cuda, name, _forbid(name))
    model, teacher = Net(p_drop=0.2).train(), Net(seed=7)
    x, y, z = make_data(dtype=torch.float32)
    t = T8.float()
    copies = [v.clone() for v in (x, y, z, t)]
    obj = objective(label_drop=0.25, **cfg)
    for tt, zz in ((t, z), (None, None)):
        loss = obj(model, x, y, teacher=teacher, t=tt, z=zz)
        loss.backward()
        assert loss.device.type == "cpu" and torch.isfinite(loss)
        for before, after in zip(copies, (x, y, z, t)):
            assert torch.equal(before, after), "inputs must not be modified in place"


# --------------------------------------------------------------------------------------------
# enhanced_style (cccvs/UCGM); exactness against the fork: tests/test_transports_reference.py
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cor", [0.0, 0.5, 1.0])
def test_default_style_is_the_lins_lab_rule(cor):
    """None = LINs-lab/UCGM's hard-coded choice: ft-vs-fe without consistency, fc-vs-xz with it."""
    model, teacher = Net().double(), Net(seed=7).double()
    x, y, z = make_data()
    default = objective(consistency=cor, enhanced=1.5, label_drop=0.25)
    named = objective(consistency=cor, enhanced=1.5, label_drop=0.25,
                      enhanced_style="ft-vs-fe" if cor == 0.0 else "fc-vs-xz")
    assert default.enhanced_style == named.enhanced_style
    assert torch.equal(default(model, x, y, teacher=teacher, t=T8, z=z), named(model, x, y, teacher=teacher, t=T8, z=z))
    other = objective(consistency=cor, enhanced=1.5, label_drop=0.25, enhanced_style="fc-vs-fe")
    assert abs(other(model, x, y, teacher=teacher, t=T8, z=z).item() - default(model, x, y, teacher=teacher, t=T8,
                                                                            z=z).item()) > 1e-6


def test_fc_vs_fe_runs_the_teacher_once_on_conditional_and_null_rows():
    model, teacher = Net().double(), Net(seed=7).double()
    x, y, z = make_data()
    obj = objective(consistency=1.0, enhanced=2.5, label_drop=0.25, enhanced_style="fc-vs-fe")
    obj(model, x, y, teacher=teacher, t=T8, z=z)
    dropped = y.clone()
    dropped[-2:] = NC
    assert [(c["batch"], c["grad"]) for c in teacher.calls] == [(16, False)]
    assert torch.equal(teacher.calls[0]["y"], torch.cat([dropped, torch.full_like(y, NC)]))
    assert torch.equal(teacher.calls[0]["t"], torch.cat([T8, T8]))
    assert [c["batch"] for c in model.calls] == [8, 16], "the student: its own forward and the central differences"
    assert obj.no_grad_forwards == 4


@pytest.mark.parametrize(("style", "cor", "count"), [("fc-vs-fe", 1.0, 4), ("fc-vs-xz", 1.0, 3), ("ft-vs-fe", 0.0, 1),
                                                     ("fc-vs-fe", 0.5, 3), ("fc-vs-fe", 0.0, 2)])
def test_no_grad_forwards_counts_the_rows_actually_evaluated(style, cor, count):
    model, teacher = Net().double(), Net(seed=7).double()
    x, y, z = make_data()
    obj = objective(consistency=cor, enhanced=0.6, label_drop=0.25, enhanced_style=style)
    obj(model, x, y, teacher=teacher, t=T8, z=z)
    rows = sum(c["batch"] for c in model.calls + teacher.calls if not c["grad"])
    assert obj.no_grad_forwards == count == rows // 8
    without_enhancement = {0.0: 0, 0.5: 1, 1.0: 2}[cor]  # the consistency branch alone
    assert objective(consistency=cor, enhanced=0.0, enhanced_style=style).no_grad_forwards == without_enhancement


def test_fc_vs_fe_with_teacher_dropout_replays_one_mask_for_both_forwards():
    """A teacher in train mode with dropout (the reference's teacher runs in train mode): two replayed forwards
    of B rows, not one of 2B, so the conditional and the unconditional rows see the reference's one mask."""
    model, teacher = Net().double(), Net(seed=7, p_drop=0.5).double().train()
    masks = []
    teacher.drop.register_forward_hook(lambda module, inputs, output: masks.append(output != 0))
    x, y, z = make_data()
    obj = objective(consistency=1.0, enhanced=2.5, label_drop=0.25, enhanced_style="fc-vs-fe")
    torch.manual_seed(3)
    obj(model, x, y, teacher=teacher, t=T8, z=z)
    assert [c["batch"] for c in teacher.calls] == [8, 8]
    assert torch.equal(masks[0], masks[1]) and 0 < masks[0].float().mean() < 1


@pytest.mark.parametrize("style", ["fc-vs-fe", "fc-vs-xz"])
def test_frame_noise_at_one_mirrors_relinear_and_leaves_linear_alone(style):
    """noise-at-1: ReLinear's loss is Linear's for the network read as -net(x, 1 - s, y); Linear is unchanged."""
    model, teacher = Net().double(), Net(seed=7).double()
    x, y, z = make_data()
    kw = dict(consistency=1.0, enhanced=2.0, label_drop=0.25, enhanced_style=style, huber_eps=0.1)
    linear = objective(transport="Linear", **kw)(model, x, y, teacher=teacher, t=T8, z=z)
    assert torch.equal(objective(transport="Linear", frame="noise-at-1", **kw)(model, x, y, teacher=teacher, t=T8,
                                                                               z=z), linear)

    def mirrored(net):
        return lambda x_in, s, labels: -net(x_in, 1 - s, labels)

    model.calls.clear()
    relinear = objective(transport="ReLinear", frame="noise-at-1", **kw)(model, x, y, teacher=teacher, t=T8, z=z)
    assert torch.equal(model.calls[0]["t"], 1 - T8) and model.calls[0]["grad"]  # the student, at 1 - s
    by_hand = objective(transport="Linear", **kw)(mirrored(model), x, y, teacher=mirrored(teacher), t=T8, z=z)
    torch.testing.assert_close(relinear, by_hand, rtol=1e-12, atol=1e-14)
    own_frame = objective(transport="ReLinear", **kw)(model, x, y, teacher=teacher, t=T8, z=z)
    assert abs(own_frame.item() - relinear.item()) > 1e-6
