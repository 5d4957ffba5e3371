"""Tuning parity with the reference's training path (LINs-lab/UCGM main.py, methods/unigen.py, networks/):
train-mode label dropout, EDM2's forced weight normalisation, the label-drop count per group of the
global batch, non-finite gradients, the precision default and the noise-at-1 frame for ReLinear.

Each test fails on the behaviour before it: no label dropout, no weight normalisation, the label drop
rounded per micro-batch, every non-finite gradient norm stopping the run, float32 on every device.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

import ucgm_convert as uc
from ucgm_convert.cli import app
from ucgm_convert.formats.latent_folder import write_latent_folder
from ucgm_convert.foundation import precision_label, sampling_dtype, tf32_matmuls
from ucgm_convert.jobs.evaluate import EvalConfig
from ucgm_convert.jobs.sample import SampleConfig
from ucgm_convert.jobs.tune import TuneConfig, TuneDiverged
from ucgm_convert.jobs.tune import run as tune
from ucgm_convert.jobs.tune.config import train_dtype
from ucgm_convert.jobs.tune.data import batch_indices, chunk_drops, label_draws
from ucgm_convert.nets import build_network
from ucgm_convert.nets.blocks import label_dropout_draws

REPO = Path(__file__).resolve().parents[1]
NULL = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lightningdit(seed: int = 0, **kw: object) -> torch.nn.Module:
    """A 1-block LightningDiT on 4x4x4 latents with 5 classes, random weights."""
    torch.manual_seed(seed)
    net = build_network("lightningdit", input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1,
                        num_heads=2, mlp_hidden=48, num_classes=5, **kw)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return net


def tiny_recipe(folder: Path) -> str:
    """The demo recipe for the 5-class tiny SiT of conftest.py."""
    text = (REPO / "recipes" / "demo.yaml").read_text().replace("num_classes: 10", "num_classes: 5")
    path = folder / "tiny.yaml"
    path.write_text(text.replace("checkpoint: embedded:demo", "checkpoint: null").replace("name: demo", "name: t"))
    return str(path)


# 1. Train-mode label dropout ------------------------------------------------------------------------


def test_lightningdit_drops_labels_in_train_mode_only_with_the_references_probability() -> None:
    net = tiny_lightningdit()
    assert net.y_embedder.dropout_prob == 0.1  # networks/lightningdit.py: class_dropout_prob=0.1
    x, t = torch.randn(64, 4, 4, 4), torch.rand(64)
    y = torch.arange(64) % 5
    u = torch.rand(64, generator=torch.Generator().manual_seed(3))
    nulled = torch.where(u < 0.1, NULL, y)
    assert 0 < int((u < 0.1).sum()) < 64
    eval_out = net.eval()(x, t, y)
    with torch.no_grad(), label_dropout_draws(net.train(), u):
        train_out = net(x, t, y)
    torch.testing.assert_close(train_out, net.eval()(x, t, nulled), rtol=0, atol=0)
    assert not torch.allclose(train_out, eval_out)
    # Eval mode ignores the draws; p = 0 never drops.
    with label_dropout_draws(net.eval(), u):
        torch.testing.assert_close(net(x, t, y), eval_out, rtol=0, atol=0)
    plain = tiny_lightningdit(class_dropout_prob=0.0).train()
    with torch.no_grad(), label_dropout_draws(plain, u):
        torch.testing.assert_close(plain(x, t, y), plain.eval()(x, t, y), rtol=0, atol=0)
    # Without draws the mask comes from the global RNG, about 10% of the rows.
    emb = net.y_embedder.train()
    torch.manual_seed(0)
    rows = emb(torch.zeros(20000, dtype=torch.long))
    dropped = (rows == emb.embedding_table.weight[NULL]).all(dim=1).float().mean()
    assert 0.09 < float(dropped) < 0.11


def test_other_families_have_no_train_mode_label_dropout() -> None:
    """The reference's SiT (REPA-E) has class_dropout_prob=0.0 and its DDT no dropout at all."""
    assert tiny_model().net.y_embedder.dropout_prob == 0.0
    ddt = build_network("ddt", patch_size=1, in_channels=4, hidden_size=32, depth=2, encoder_depth=1,
                        num_heads=2, num_classes=5)
    assert ddt.y_embedder.dropout_prob == 0.0


def test_objective_replays_the_students_mask_and_the_teacher_draws_its_own() -> None:
    """As the reference training_step: the finite-difference forwards see the student's label mask
    (RNG replayed), the train-mode teacher a fresh one; equal to eval-mode nets given nulled labels."""
    student, teacher = tiny_lightningdit(0).train(), tiny_lightningdit(1).train()
    x, z, t = torch.randn(8, 4, 4, 4), torch.randn(8, 4, 4, 4), torch.rand(8) * 0.8 + 0.1
    y = torch.arange(8) % 5
    g = torch.Generator().manual_seed(5)
    u_student, u_teacher = torch.rand(8, generator=g), torch.rand(8, generator=g)
    obj = uc.UCGMObjective(transport="ReLinear", consistency=1.0, enhanced=1.3, huber_eps=0.05, label_drop=0.25,
                           weighting="Cosine", num_classes=5)
    with torch.no_grad(), label_dropout_draws(student, u_student), label_dropout_draws(teacher, u_teacher):
        got = obj(student, x, y, teacher=teacher, t=t, z=z)

    def nulling(net: torch.nn.Module, u: torch.Tensor):
        return lambda x_t, s, labels: net(x_t, s, torch.where(u.repeat(len(labels) // 8) < 0.1, NULL, labels))

    with torch.no_grad():
        want = obj(nulling(student.eval(), u_student), x, y, teacher=nulling(teacher.eval(), u_teacher), t=t, z=z)
        same_masks = obj(nulling(student, u_student), x, y, teacher=nulling(teacher, u_student), t=t, z=z)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, same_masks)


def test_label_draws_are_per_sample() -> None:
    """Row j of step s has the same draws whatever the micro-batch cut (a function of seed, step, row)."""
    a = label_draws(0, 3, 16)
    torch.testing.assert_close(a.view(2, 4, 4)[:, 2], a[:, 8:12], rtol=0, atol=0)
    assert torch.equal(label_draws(0, 3, 16), a) and not torch.equal(label_draws(0, 4, 16), a)
    assert not torch.equal(a[0], a[1])  # the teacher's mask is not the student's


def test_edm2_forced_weight_normalisation_in_train_mode() -> None:
    """Upstream EDM2 / the reference's MPConv: a train-mode forward replaces each weight by its normalised
    value (output unchanged); the UCGM-T objective's no-grad forwards leave it alone and backward works."""
    net = build_network("edm2-unet", img_resolution=8, img_channels=4, label_dim=5, model_channels=16,
                        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 2.0)
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.arange(4)
    ref = net.eval()(x, t, y)
    conv = next(m for m in net.modules() if type(m).__name__ == "MPConv")
    before = conv.weight.detach().clone()
    with torch.no_grad():
        net.train()(x, t, y)
    assert torch.equal(conv.weight, before)  # no-grad forward: untouched
    out = net.train()(x, t, y)
    # Equal up to normalize()'s eps (1e-4 per layer), and exactly the eval output of the new weights.
    assert float((out - ref).detach().abs().max()) <= 1e-3 * float(ref.detach().abs().max())
    torch.testing.assert_close(out, net.eval()(x, t, y), rtol=0, atol=0)
    rms = conv.weight.detach().flatten(1).pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)
    obj = uc.UCGMObjective(transport="EDM", consistency=1.0, enhanced=0.0, label_drop=0.0, num_classes=5)
    obj(net, x, y, t=torch.rand(4) * 0.5 + 0.2, z=torch.randn_like(x)).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


# 3. Label-drop count --------------------------------------------------------------------------------


def test_label_drop_is_rounded_per_group_not_per_micro_batch() -> None:
    # The reference: 128 rows per GPU -> round(12.8) = 13 dropped, the last 13 of each.
    assert chunk_drops(1024, 128, 0.1, 128) == [13] * 8
    assert sum(chunk_drops(1024, 128, 0.1, 4)) == 104 and chunk_drops(1024, 128, 0.1, 4)[27:32] == [0, 1, 4, 4, 4]
    # Micro-batches of 4 (the old rule: round(0.4) = 0 each, nothing dropped): the last 2 of 16.
    assert chunk_drops(16, 16, 0.1, 4) == [0, 0, 0, 2]
    assert chunk_drops(16, 16, 0.1, 16) == [2]
    assert chunk_drops(20, 8, 0.5, 4) == [0, 4, 0, 4, 2]  # a last, shorter group of 4 drops round(2) = 2


def test_accumulated_micro_batches_are_the_objective_of_the_whole_batch() -> None:
    """Flow matching (per-sample loss): 4 chunks of 4 with chunk_drops == one batch of 16."""
    model = tiny_model()
    obj = uc.UCGMObjective(transport="Linear", consistency=0.0, enhanced=0.0, label_drop=0.1, num_classes=5)
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, 3, 8, 8, generator=g)
    t, y = torch.rand(16, generator=g), torch.arange(16) % 5
    with torch.no_grad():
        whole = obj(model, x, y, t=t, z=z)
        drops = chunk_drops(16, 16, 0.1, 4)
        parts = [obj(model, x[r], y[r], t=t[r], z=z[r], ndrop=n)
                 for r, n in zip(torch.arange(16).view(4, 4), drops)]
        per_chunk_rounding = [obj(model, x[r], y[r], t=t[r], z=z[r]) for r in torch.arange(16).view(4, 4)]
    torch.testing.assert_close(torch.stack(parts).mean(), whole, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(torch.stack(per_chunk_rounding).mean(), whole)


# 5. Precision ---------------------------------------------------------------------------------------


def test_precision_auto_is_the_references_on_cuda_and_float32_on_cpu() -> None:
    """Tuning: bf16 autocast on CUDA (scripts/run_train.sh PRECISION=bf16); sampling: TF32 matmuls
    (eval.py allow_tf32 = True); CPU: float32 for both."""
    assert TuneConfig.model_fields["dtype"].default == "auto"
    assert train_dtype("auto", "cuda") == "bfloat16" and train_dtype("auto", "cpu") == "float32"
    assert train_dtype("float32", "cuda") == "float32" and train_dtype("bfloat16", "cpu") == "bfloat16"
    assert SampleConfig.model_fields["dtype"].default == "auto" and EvalConfig.model_fields["dtype"].default == "auto"
    assert sampling_dtype("auto", "cuda") == "tf32" and sampling_dtype("auto", "cpu") == "float32"
    assert sampling_dtype("tf32", "cpu") == "float32" and sampling_dtype("bfloat16", "cuda") == "bfloat16"
    assert precision_label("tf32", "auto") == "float32 weights, TF32 matmuls (auto: the reference samples with TF32)"
    assert precision_label("float32", "auto") == "float32 (auto: float32 off CUDA)"
    saved = torch.backends.cuda.matmul.allow_tf32
    with tf32_matmuls():
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == saved


def test_tune_prints_the_resolved_precision(tmp_path: Path) -> None:
    """On CPU --dtype auto trains in float32 and the settings table says why."""
    ckpt = uc.save_checkpoint(tiny_model(), tmp_path / "tiny")
    data = write_latent_folder(tmp_path / "data", torch.randn(16, 3, 8, 8), torch.arange(16) % 5)
    result = CliRunner().invoke(app, ["tune", "--from", tiny_recipe(tmp_path), "--checkpoint", str(ckpt), "--data",
                                      str(data), "--out", str(tmp_path / "out"), "--global-batch", "8", "--steps",
                                      "1", "--sample-every", "0", "--device", "cpu"], env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    assert re.search(r"precision\s+│ float32 \(auto: float32 off CUDA\) on cpu", result.output), result.output
    assert "0 step(s) skipped for a non-finite gradient" in " ".join(result.output.split())


# 6. Non-finite gradients ----------------------------------------------------------------------------


def exploding_model() -> uc.GenerativeModel:
    """The tiny SiT whose final layer scales activations by ~1e21 for class 4 only (and shrinks its
    weight by 1e-21): the output and loss stay finite, the gradient norm of a batch with class 4 is inf."""
    model = tiny_model()
    net = model.net
    d = net.final_layer.linear.in_features
    with torch.no_grad():
        for block in net.blocks:
            block.adaLN_modulation[1].weight[:, 0] = 0.0
        net.final_layer.adaLN_modulation[1].weight[:, 0] = 0.0
        net.final_layer.adaLN_modulation[1].weight[d:, 0] = 1.0
        net.y_embedder.embedding_table.weight[:, 0] = 0.0
        net.y_embedder.embedding_table.weight[4, 0] = 1e21
        net.final_layer.linear.weight.mul_(1e-21)
    return model


def test_non_finite_gradients_are_skipped_counted_and_stop_after_max_skipped(tmp_path: Path) -> None:
    ckpt = uc.save_checkpoint(exploding_model(), tmp_path / "tiny")
    n = 48
    labels = torch.arange(n) % 4
    labels[[5, 17]] = 4  # two samples of the exploding class
    data = write_latent_folder(tmp_path / "data", torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
                               labels)
    common = dict(recipe=tiny_recipe(tmp_path), checkpoint=str(ckpt), data=str(data), global_batch=8, lr=1e-27,
                  sample_every=0)  # lr: updates far below the 1e-21-scaled weights keep class 4 finite
    # Which steps hold a class-4 row that keeps its label (the last round(0.1 * 8) = 1 row is dropped).
    bad = {s for s in range(6) if bool((labels[batch_indices(n, 8, 0, s)][:7] == 4).any())}
    assert bad and len(bad) < 6
    out = tmp_path / "out"
    result = tune(TuneConfig.flat(out=out, steps=6, max_skipped=3, save_every=0, **common))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [math.isfinite(m["grad_norm"]) for m in lines] == [s not in bad for s in range(6)]
    assert [m["skipped"] for m in lines] == [sum(1 for b in bad if b <= s) for s in range(6)]
    assert result.skipped_steps == len(bad) and all(math.isfinite(m["loss"]) for m in lines)
    # Every step non-finite (class 4 everywhere): stops at the third skip in a row, weights untouched.
    data4 = write_latent_folder(tmp_path / "all4", torch.randn(n, 3, 8, 8), torch.full((n,), 4))
    with pytest.raises(TuneDiverged, match=r"step 3: the gradient norm is inf .* 3 steps in a row \(--max-skipped"):
        tune(TuneConfig.flat(out=tmp_path / "out4", steps=6, max_skipped=3, save_every=0, **{**common,
                                                                                           "data": str(data4)}))


# 8. Mirrored time for ReLinear ----------------------------------------------------------------------


def test_frame_noise_at_1_trains_relinear_exactly_as_linear() -> None:
    lin = tiny_model()

    def relinear(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -lin(x_t, 1 - t, y)  # the same model in ReLinear's convention (noise at t = 0, F = x - z)

    g = torch.Generator().manual_seed(0)
    x, z, t = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g), torch.rand(8, generator=g)
    y = torch.arange(8) % 5
    kw = dict(consistency=1.0, enhanced=1.3, huber_eps=0.05, label_drop=0.25, weighting="Cosine", num_classes=5)
    with torch.no_grad():
        want = uc.UCGMObjective(transport="Linear", **kw)(lin, x, y, t=t, z=z)
        got = uc.UCGMObjective(transport="ReLinear", frame="noise-at-1", **kw)(relinear, x, y, t=t, z=z)
        plain = uc.UCGMObjective(transport="ReLinear", **kw)(relinear, x, y, t=1 - t, z=z)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, want, rtol=1e-2)
    # Linear has noise at t = 1 already: the frame changes nothing.
    assert not uc.UCGMObjective(transport="Linear", frame="noise-at-1").mirrored
