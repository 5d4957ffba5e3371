"""Classifier-free guidance wrapper uc.guided, checked against separate hand-made forwards.

    F = F_u + scale * (F_c - F_u)   when lo <= t <= hi (both ends inclusive)
    F = F_c                         otherwise

F_c: the model with the caller's labels; F_u: the model with the null class (or a separate
uncond_model with the same labels). Inside the interval cond and uncond run in ONE batched
forward of 2B rows.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ucgm_convert as uc

NC = 6  # classes; null class NC
C = 4  # channels


class Net(nn.Module):
    """F(x_t, t, y) on x [B, C, 2, 2]; the label embedding has NC + 2 rows so that a
    null_class of NC + 1 is also valid. Records (batch, labels, t) of every call."""

    def __init__(self, seed=0, num_classes=NC, **attrs):
        super().__init__()
        if num_classes is not None:
            self.num_classes = num_classes
        for k, v in attrs.items():
            setattr(self, k, v)
        dim = C * 4
        self.emb = nn.Embedding(NC + 2, 16)
        self.inp = nn.Linear(dim + 1, 16)
        self.out = nn.Linear(16, dim)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append({"batch": x.shape[0], "y": y.clone(), "t": t.clone(), "x": x.clone()})
        h = torch.tanh(self.inp(torch.cat([x.flatten(1), t[:, None]], 1)) + self.emb(y))
        return self.out(h).view_as(x)


def data(batch=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, 2, 2, generator=gen)
    y = torch.randint(0, NC, (batch,), generator=gen)
    return x, y


def hand_cfg(net, x, t, y, scale, null, lo, hi, channels=None, uncond_net=None):
    """Two separate forwards, mixed by hand, row by row."""
    with torch.no_grad():
        cond = net(x, t, y)
        uncond = uncond_net(x, t, y) if uncond_net is not None else net(x, t, torch.full_like(y, null))
    out = cond.clone()
    n = C if channels is None else channels
    # compare in t's own dtype: t = 0.8 (float32) is at the end of the interval (0.2, 0.8)
    lo_t, hi_t = torch.tensor(lo, dtype=t.dtype), torch.tensor(hi, dtype=t.dtype)
    for i in range(x.shape[0]):
        if lo_t <= t[i] <= hi_t:
            out[i, :n] = uncond[i, :n] + scale * (cond[i, :n] - uncond[i, :n])
    return out


def _check_batched_call(call, x, t, y, null):
    """One forward of 2B rows holding (x, t, y) and (x, t, null) in either order."""
    B = x.shape[0]
    assert call["batch"] == 2 * B
    torch.testing.assert_close(call["x"], torch.cat([x, x]))
    torch.testing.assert_close(call["t"], torch.cat([t, t]))
    halves = call["y"].chunk(2)
    nulls = torch.full_like(y, null)
    assert (torch.equal(halves[0], y) and torch.equal(halves[1], nulls)) or (
        torch.equal(halves[0], nulls) and torch.equal(halves[1], y)
    )


@pytest.mark.parametrize("scale", [1.0, 1.5, 4.0, 0.0])
def test_inside_interval_equals_cfg_of_two_forwards(scale):
    net = Net()
    x, y = data()
    lo, hi = 0.2, 0.8
    t = torch.tensor([0.2, 0.35, 0.5, 0.65, 0.8])  # both ends exactly
    fn = uc.guided(net, scale, interval=(lo, hi))
    out = fn(x, t, y)
    assert len(net.calls) == 1, "cond and uncond must run in one batched forward"
    _check_batched_call(net.calls[0], x, t, y, NC)
    net.calls.clear()
    expected = hand_cfg(net, x, t, y, scale, NC, lo, hi)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    if scale != 1.0:
        cond = net(x, t, y).detach()
        assert not torch.allclose(out, cond), "guidance must change the output inside the interval"


def test_outside_interval_is_conditional_with_one_forward():
    net = Net()
    x, y = data()
    t = torch.tensor([0.0, 0.1, 0.1999, 0.8001, 1.0])
    fn = uc.guided(net, 3.0, interval=(0.2, 0.8))
    out = fn(x, t, y)
    assert [c["batch"] for c in net.calls] == [5]
    assert torch.equal(net.calls[0]["y"], y)
    net.calls.clear()
    torch.testing.assert_close(out, net(x, t, y).detach(), rtol=0, atol=0)


def test_mixed_batch_rows_inside_and_outside():
    net = Net()
    x, y = data(batch=6)
    lo, hi = 0.3, 0.7
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.69])
    fn = uc.guided(net, 2.5, interval=(lo, hi))
    out = fn(x, t, y)
    assert len(net.calls) == 1
    _check_batched_call(net.calls[0], x, t, y, NC)
    net.calls.clear()
    expected = hand_cfg(net, x, t, y, 2.5, NC, lo, hi)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    cond = net(x, t, y).detach()
    # rows 0 and 4 are outside: exactly conditional; the others are guided
    for i in (0, 4):
        torch.testing.assert_close(out[i], cond[i], rtol=1e-6, atol=1e-6)
    for i in (1, 2, 3, 5):
        assert not torch.allclose(out[i], cond[i])


def test_default_interval_guides_everywhere_in_unit_range():
    net = Net()
    x, y = data()
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    out = uc.guided(net, 2.0)(x, t, y)
    net.calls.clear()
    torch.testing.assert_close(out, hand_cfg(net, x, t, y, 2.0, NC, 0.0, 1.0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Channels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3])
def test_int_channels_guides_only_first_n(n):
    net = Net()
    x, y = data()
    t = torch.full((5,), 0.5)
    out = uc.guided(net, 3.0, interval=(0.0, 1.0), channels=n)(x, t, y)
    net.calls.clear()
    expected = hand_cfg(net, x, t, y, 3.0, NC, 0.0, 1.0, channels=n)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    cond = net(x, t, y).detach()
    torch.testing.assert_close(out[:, n:], cond[:, n:], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[:, :n], cond[:, :n])


def test_all_channels_and_none_without_policy_guide_everything():
    net = Net()
    x, y = data()
    t = torch.full((5,), 0.5)
    full = hand_cfg(net, x, t, y, 3.0, NC, 0.0, 1.0)
    for channels in ("all", None, C):
        out = uc.guided(net, 3.0, interval=(0.0, 1.0), channels=channels)(x, t, y)
        torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)


def test_none_channels_uses_model_guidance_channels_policy():
    net = Net(guidance_channels=3)
    x, y = data()
    t = torch.full((5,), 0.5)
    out = uc.guided(net, 3.0, interval=(0.0, 1.0))(x, t, y)
    net.calls.clear()
    torch.testing.assert_close(out, hand_cfg(net, x, t, y, 3.0, NC, 0.0, 1.0, channels=3), rtol=1e-5, atol=1e-6)
    cond = net(x, t, y).detach()
    torch.testing.assert_close(out[:, 3:], cond[:, 3:], rtol=1e-6, atol=1e-6)
    # an explicit choice overrides the policy
    out_all = uc.guided(net, 3.0, interval=(0.0, 1.0), channels="all")(x, t, y)
    torch.testing.assert_close(out_all, hand_cfg(net, x, t, y, 3.0, NC, 0.0, 1.0), rtol=1e-5, atol=1e-6)
    out_one = uc.guided(net, 3.0, interval=(0.0, 1.0), channels=1)(x, t, y)
    torch.testing.assert_close(
        out_one, hand_cfg(net, x, t, y, 3.0, NC, 0.0, 1.0, channels=1), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("channels", [0, -1, "first", 1.5, "ALL3"])
def test_invalid_channels_raise_value_error(channels):
    net = Net()
    x, y = data()
    with pytest.raises(ValueError, match="channels"):
        fn = uc.guided(net, 2.0, interval=(0.0, 1.0), channels=channels)
        fn(x, torch.full((5,), 0.5), y)


# ---------------------------------------------------------------------------------------------
# Null class
# ---------------------------------------------------------------------------------------------


def _null_seen(net, x, y):
    net.calls.clear()
    uc.guided(net, 2.0, interval=(0.0, 1.0))(x, torch.full((x.shape[0],), 0.5), y)
    call = net.calls[0]
    labels = call["y"]
    halves = labels.chunk(2)
    other = halves[1] if torch.equal(halves[0], y) else halves[0]
    assert len(set(other.tolist())) == 1
    return other[0].item()


def test_null_class_from_model_attributes():
    x, y = data()
    # null_class attribute wins over num_classes
    assert _null_seen(Net(num_classes=NC, null_class=NC + 1), x, y) == NC + 1
    # else num_classes
    assert _null_seen(Net(num_classes=NC), x, y) == NC
    assert _null_seen(Net(num_classes=NC - 1), x, y % (NC - 1)) == NC - 1


def test_null_class_explicit_argument_for_plain_function():
    net = Net(num_classes=None)
    assert not hasattr(net, "num_classes") and not hasattr(net, "null_class")
    x, y = data()
    t = torch.full((5,), 0.5)

    def fn(x_t, tt, labels):
        return net(x_t, tt, labels)

    out = uc.guided(fn, 2.0, interval=(0.0, 1.0), null_class=NC + 1)(x, t, y)
    assert len(net.calls) == 1
    _check_batched_call(net.calls[0], x, t, y, NC + 1)
    net.calls.clear()
    torch.testing.assert_close(out, hand_cfg(net, x, t, y, 2.0, NC + 1, 0.0, 1.0), rtol=1e-5, atol=1e-6)


def test_missing_null_class_raises_value_error():
    net = Net(num_classes=None)
    x, y = data()

    def fn(x_t, tt, labels):
        return net(x_t, tt, labels)

    for model in (net, fn):
        with pytest.raises(ValueError, match="null_class"):
            g = uc.guided(model, 2.0, interval=(0.0, 1.0))
            g(x, torch.full((5,), 0.5), y)


# ---------------------------------------------------------------------------------------------
# Separate unconditional network
# ---------------------------------------------------------------------------------------------


def test_uncond_model_supplies_uncond_prediction():
    net, guide = Net(seed=0), Net(seed=3)
    x, y = data()
    lo, hi = 0.2, 0.8
    t = torch.tensor([0.1, 0.2, 0.5, 0.8, 0.9])
    out = uc.guided(net, 2.5, interval=(lo, hi), uncond_model=guide)(x, t, y)
    assert [c["batch"] for c in net.calls] == [5]
    assert [c["batch"] for c in guide.calls] == [5]
    assert torch.equal(net.calls[0]["y"], y)
    assert torch.equal(guide.calls[0]["y"], y), "uncond_model is called with the same labels"
    net.calls.clear()
    guide.calls.clear()
    expected = hand_cfg(net, x, t, y, 2.5, None, lo, hi, uncond_net=guide)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # and it is not the null-class guidance of the model itself
    null_cfg = hand_cfg(net, x, t, y, 2.5, NC, lo, hi)
    assert not torch.allclose(out, null_cfg)


def test_uncond_model_outside_interval_runs_only_model_and_needs_no_null_class():
    net, guide = Net(seed=0, num_classes=None), Net(seed=3)
    x, y = data()
    t = torch.tensor([0.0, 0.05, 0.9, 0.95, 1.0])
    out = uc.guided(net, 2.5, interval=(0.2, 0.8), uncond_model=guide)(x, t, y)
    assert [c["batch"] for c in net.calls] == [5]
    assert guide.calls == []
    net.calls.clear()
    torch.testing.assert_close(out, net(x, t, y).detach(), rtol=0, atol=0)


def test_uncond_model_with_channels():
    net, guide = Net(seed=0), Net(seed=3)
    x, y = data()
    t = torch.full((5,), 0.5)
    out = uc.guided(net, 2.0, interval=(0.0, 1.0), channels=2, uncond_model=guide)(x, t, y)
    net.calls.clear()
    guide.calls.clear()
    expected = hand_cfg(net, x, t, y, 2.0, None, 0.0, 1.0, channels=2, uncond_net=guide)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Interval validation and use with the sampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [(0.8, 0.2), (1.0, 0.0), (0.5, 0.4999)])
def test_reversed_interval_raises_value_error(interval):
    net = Net()
    x, y = data()
    with pytest.raises(ValueError, match="interval"):
        g = uc.guided(net, 2.0, interval=interval)
        g(x, torch.full((5,), 0.5), y)


def test_degenerate_interval_guides_only_that_time():
    net = Net()
    x, y = data()
    t = torch.tensor([0.25, 0.5, 0.5, 0.75, 0.0])
    out = uc.guided(net, 2.0, interval=(0.5, 0.5))(x, t, y)
    net.calls.clear()
    torch.testing.assert_close(out, hand_cfg(net, x, t, y, 2.0, NC, 0.5, 0.5), rtol=1e-5, atol=1e-6)


def test_guided_model_fn_drives_the_sampler_like_hand_cfg():
    """uc.sample(guided(...), y=...) equals uc.sample with a hand-written CFG model_fn."""
    net = Net()
    x, y = data()
    lo, hi = 0.3, 0.9
    noise = torch.randn(5, C, 2, 2, generator=torch.Generator().manual_seed(4))

    def manual(x_t, t, y):
        return hand_cfg(net, x_t, t, y, 1.8, NC, lo, hi)

    got = uc.sample(uc.guided(net, 1.8, interval=(lo, hi)), noise, steps=4, y=y)
    want = uc.sample(manual, noise, steps=4, y=y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
