"""ExCB: each equation against a hand computation, the balancing behaviour on an imbalanced stream, DDP exactness
of the size estimate, and the model/checkpoint invariants. Oracle values are from the spec (specs/excb.md)."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import excb
import lt_data
from conftest import HANG_GUARD, ROOT, TINY_ARGS, run_script, script_env

# ------------------------------------------------------------------ balancing operator


def test_balance_scores_oracle():
    # K=4, s=(.5,.25,.125,.125): r = 4*s/1 = (2, 1, .5, .5)
    # z=.8, r=2 -> (1.8)/2-1 = -.1 ; z=.5, r=1 -> .5 ; z=.2, r=.5 -> 1-.8*.5 = .6 ; z=-.4, r=.5 -> 1-1.4*.5 = .3
    z = torch.tensor([[0.8, 0.5, 0.2, -0.4]])
    s = torch.tensor([0.5, 0.25, 0.125, 0.125])
    torch.testing.assert_close(excb.balance_scores(z, s), torch.tensor([[-0.1, 0.5, 0.6, 0.3]]))
    # only the ratios matter: scaling s changes nothing
    torch.testing.assert_close(excb.balance_scores(z, 7 * s), torch.tensor([[-0.1, 0.5, 0.6, 0.3]]))


def test_balance_scores_identity_monotone_and_limits():
    z = torch.linspace(-1, 1, 41)[:, None].repeat(1, 3)
    assert torch.equal(excb.balance_scores(z, torch.full((3,), 1 / 3)), z)
    s = torch.tensor([1e-9, 1.0, 1e9])  # r ~ (0, ~0, ~3): starved clusters score 1, a huge one scores ~ -1
    b = excb.balance_scores(z, s)
    assert (b >= -1).all() and (b <= 1).all()
    assert (b[1:] >= b[:-1]).all()  # increasing in z per cluster
    torch.testing.assert_close(b[:, 0], torch.ones(41), atol=1e-6, rtol=0)
    s = torch.tensor([1e-9, 1e-9, 1.0])  # r = (~0, ~0, ~3)
    assert (excb.balance_scores(z, s)[:, 2] <= -1 + 2 / 3 + 1e-6).all()
    s = torch.tensor([1.0, 1e-12, 1e-12, 1e-12])  # r_0 -> 4: (1+z)/4 - 1 in [-1, -.5]
    z4 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(excb.balance_scores(z4, s)[:, 0], torch.tensor([-0.5, -1.0]), atol=1e-6, rtol=0)


def test_excb_targets_and_loss_oracle_k4():
    z = torch.tensor([[0.8, 0.5, 0.2, -0.4]])
    s = torch.tensor([0.5, 0.25, 0.125, 0.125])
    # balanced (-.1, .5, .6, .3); boost the max .6 -> .606; softmax at .04 by hand
    zb = [-0.1, 0.5, 0.606, 0.3]
    e = [math.exp(v / 0.04) for v in zb]
    q_hand = torch.tensor([[v / sum(e) for v in e]])
    q = excb.excb_targets(z, s, 0.04)
    torch.testing.assert_close(q, q_hand, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(q, torch.tensor([[2.0e-8, 0.06596, 0.93360, 4.44e-4]]), rtol=2e-3, atol=1e-9)
    assert q.argmax().item() == 2 and z.argmax().item() == 0  # balancing moved the assignment
    # CE with student logits z/.1: -sum q log softmax(z/.1)
    lse = math.log(sum(math.exp(v / 0.1) for v in z[0].tolist()))
    ce = -sum(qk * (zk / 0.1 - lse) for qk, zk in zip(q_hand[0].tolist(), z[0].tolist()))
    assert excb.excb_loss(q, z, 0.1).item() == pytest.approx(ce, rel=1e-5)
    assert ce == pytest.approx(5.8557, abs=1e-3)


def test_excb_targets_and_loss_oracle_k2():
    z = torch.tensor([[0.2, 0.0]])
    q = excb.excb_targets(z, torch.tensor([0.75, 0.25]), 0.04)
    # r=(1.5,.5): z^B=(1.2/1.5-1, 1-1*.5)=(-.2,.5), boost -> .505; q_0 = 1/(1+exp(.705/.04))
    assert q[0, 0].item() == pytest.approx(1 / (1 + math.exp(0.705 / 0.04)), rel=1e-4)
    assert excb.excb_loss(q, z, 0.1).item() == pytest.approx(math.log(1 + math.e**2), abs=1e-5)  # 2.12693
    qu = excb.excb_targets(z, torch.tensor([0.5, 0.5]), 0.04)  # uniform: z boosted to (.202, 0)
    q1 = 1 / (1 + math.exp(0.202 / 0.04))
    ce = -((1 - q1) * math.log(1 / (1 + math.exp(-2))) + q1 * math.log(1 / (1 + math.exp(2))))
    assert excb.excb_loss(qu, z, 0.1).item() == pytest.approx(ce, rel=1e-5)
    assert ce == pytest.approx(0.13967, abs=1e-4)


def test_boost_on_a_negative_maximum_and_clamp():
    z = torch.tensor([[-0.5, -0.6], [1.0, 0.0]])
    q = excb.excb_targets(z, torch.tensor([0.5, 0.5]), 1.0)
    # row 0: max -.5 -> -.505; row 1: 1.01 clamped to 1
    torch.testing.assert_close(q[0], torch.softmax(torch.tensor([-0.505, -0.6]), 0))
    torch.testing.assert_close(q[1], torch.softmax(torch.tensor([1.0, 0.0]), 0))
    zg = torch.randn(3, 5, requires_grad=True)
    assert not excb.excb_targets(zg, torch.full((5,), 0.2)).requires_grad


def test_loss_is_the_batch_mean_of_the_row_cross_entropies():
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(5, 7), 1)
    z = torch.rand(5, 7) * 2 - 1
    rows = []
    for i in range(5):
        logits = (z[i] / 0.1).tolist()
        m = max(logits)
        lse = m + math.log(sum(math.exp(v - m) for v in logits))
        rows.append(-sum(qk * (lk - lse) for qk, lk in zip(q[i].tolist(), logits)))
    assert excb.excb_loss(q, z, 0.1).item() == pytest.approx(sum(rows) / 5, rel=1e-5)


# ------------------------------------------------------------------ size estimate


def test_update_cluster_sizes_oracle():
    s = torch.full((4,), 0.25)
    new = excb.update_cluster_sizes(s, torch.tensor([0, 0, 0, 1]), momentum=0.9)
    # h = (3/4, 1/4, 0, 0); .9*.25 + .1*h
    torch.testing.assert_close(new, torch.tensor([0.3, 0.25, 0.225, 0.225]))
    assert new.sum().item() == pytest.approx(1.0, abs=1e-6) and new.dtype == torch.float32
    # momentum 0: s is the last batch's histogram; momentum 1: s stays
    torch.testing.assert_close(
        excb.update_cluster_sizes(s, torch.tensor([2, 2, 3, 3, 3, 3, 3, 1]), 0.0),
        torch.tensor([0.0, 0.125, 0.25, 0.625]),
    )
    assert torch.equal(excb.update_cluster_sizes(s, torch.tensor([0, 0]), 1.0), s)


def test_update_cluster_sizes_stays_float32_under_bf16_autocast():
    s = torch.full((1024,), 1 / 1024)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new = excb.update_cluster_sizes(s, torch.zeros(16, dtype=torch.long), momentum=0.999)
    assert new.dtype == torch.float32
    assert new[0].item() == pytest.approx(0.999 / 1024 + 0.001, rel=1e-5)  # bf16 would not move it
    assert new[1].item() == pytest.approx(0.999 / 1024, rel=1e-5)


def _ddp_worker(rank, world, init_file, batches, momentum, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        s = torch.full((8,), 1 / 8)
        for a in batches:  # each batch [2B]: rank r takes its half
            half = a.chunk(world)[rank]
            s = excb.update_cluster_sizes(s, half, momentum)
        torch.save(s, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_size_update_two_gloo_processes_equal_one_process_at_twice_the_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = torch.randint(0, 8, (6, 10), generator=g)  # 6 steps, global batch 2B = 10
    batches[:, :5] = torch.randint(0, 2, (6, 5), generator=g)  # rank 0's half is skewed: per-rank h differ
    momentum = 0.7
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), batches, momentum, str(tmp_path / "s")), nprocs=2)
    s0, s1 = torch.load(tmp_path / "s.0", weights_only=True), torch.load(tmp_path / "s.1", weights_only=True)
    one = torch.full((8,), 1 / 8)
    for a in batches:
        one = excb.update_cluster_sizes(one, a, momentum)
    hand = torch.full((8,), 1 / 8, dtype=torch.float64)  # independent: momentum average of global histograms
    for a in batches:
        hand = momentum * hand + (1 - momentum) * torch.tensor(
            [(a == k).sum().item() / 10 for k in range(8)], dtype=torch.float64
        )
    torch.testing.assert_close(s0, s1, rtol=0, atol=0)
    torch.testing.assert_close(s0, one, rtol=0, atol=1e-6)
    torch.testing.assert_close(one.double(), hand, rtol=0, atol=1e-6)


def _diagnostics(features, world=1):
    """excb.diagnostics on a fake run and step output whose teacher projections are ``features`` [N, D]."""
    from types import SimpleNamespace

    n, k = features.shape[0], 4
    args = SimpleNamespace(num_clusters=k, student_temp=0.1)
    run = SimpleNamespace(args=args, model=SimpleNamespace(sizes=torch.full((k,), 1 / k)), world_size=world)
    scores = torch.zeros(n, k)
    out = {
        "teacher_features": features,
        "teacher_scores": scores,
        "targets": torch.softmax(scores, 1),
        "assignments": torch.arange(n) % k,
        "student_scores": scores,
    }
    return excb.diagnostics(run, out)


def _cone_worker(rank, world, init_file, features, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_diagnostics(features.chunk(world)[rank], world)["charts/teacher_cone"], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_teacher_cone_chart_is_the_norm_of_the_global_mean_unit_projection(tmp_path):
    e = torch.eye(3)
    one_direction = torch.stack([2 * e[0], 0.5 * e[0], 7 * e[0], e[0]])  # every image projects to one direction
    assert _diagnostics(one_direction)["charts/teacher_cone"].item() == pytest.approx(1.0)
    opposite = torch.stack([e[0], -3 * e[0], e[1], -e[1]])  # spread features: the unit vectors cancel
    assert _diagnostics(opposite)["charts/teacher_cone"].item() == pytest.approx(0.0, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(8, 5, generator=g) + torch.tensor([3.0, 0, 0, 0, 0])
    hand = torch.stack([f / f.norm() for f in features.double()]).mean(0).norm().item()
    assert _diagnostics(features)["charts/teacher_cone"].item() == pytest.approx(hand, rel=1e-6)
    # under DDP it is the global batch's: two gloo ranks with half the rows each give the one-process value
    features[:4] += torch.tensor([0, 4.0, 0, 0, 0])  # rank 0's half leans elsewhere: per-rank values differ
    mp.spawn(_cone_worker, args=(2, str(tmp_path / "init"), features, str(tmp_path / "c")), nprocs=2)
    cones = [torch.load(tmp_path / f"c.{r}", weights_only=True).item() for r in (0, 1)]
    one = _diagnostics(features)["charts/teacher_cone"].item()
    assert cones[0] == cones[1] == pytest.approx(one, rel=1e-6)
    assert abs(_diagnostics(features[:4])["charts/teacher_cone"].item() - one) > 0.01


# ------------------------------------------------------------------ behaviour on an imbalanced stream


def _usage_over_stream(balancing: bool, momentum: float, steps: int = 1000, batch: int = 16, k: int = 16):
    """A fixed teacher (k unit centroids) scoring a stream of batches from a mixture whose head cluster is 50x
    each tail cluster; returns the usage shares of the (balanced) teacher argmax over the second half."""
    g = torch.Generator().manual_seed(0)
    centroids = F.normalize(torch.randn(k, 32, generator=g), dim=1)
    weights = torch.tensor([50.0] + [1.0] * (k - 1))
    s = torch.full((k,), 1 / k)
    usage = torch.zeros(k)
    for t in range(steps):
        comp = torch.multinomial(weights, batch, replacement=True, generator=g)
        x = F.normalize(centroids[comp] + 0.3 * torch.randn(batch, 32, generator=g), dim=1)
        z = x @ centroids.t()
        q = excb.excb_targets(z, s if balancing else torch.ones(k), 0.04)
        a = q.argmax(1)
        s = excb.update_cluster_sizes(s, a, momentum)
        if t >= steps // 2:
            usage += torch.bincount(a, minlength=k)
    return usage / usage.sum()


def _entropy(p):
    return -(p * p.clamp_min(1e-12).log()).sum().item()


def test_balancing_drives_usage_of_an_imbalanced_stream_to_uniform(capsys):
    k = 16
    raw = _usage_over_stream(False, 0.99)
    for m in (0.9, 0.99):
        bal = _usage_over_stream(True, m)
        with capsys.disabled():
            print(
                f"\nusage entropy / log K over the stream (head 50x tail, batch 16, K 16): balanced (m_s={m}) "
                f"{_entropy(bal) / math.log(k):.3f} (max share {bal.max():.3f}), unbalanced "
                f"{_entropy(raw) / math.log(k):.3f} (max share {raw.max():.3f})"
            )
        assert _entropy(bal) > 0.98 * math.log(k) and bal.max() < 0.1
    assert raw.max() > 0.6 and _entropy(raw) < 0.6 * math.log(k)
    # size momentum 1: s never moves, so balancing is the identity and usage stays raw
    torch.testing.assert_close(_usage_over_stream(True, 1.0), raw)


# ------------------------------------------------------------------ k-means, model, checkpoint


def test_spherical_kmeans_recovers_separated_directions():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(6)  # 6 orthogonal directions in R^6
    x = torch.cat([centres[i] + 0.05 * torch.randn(30, 6, generator=g) for i in range(6)])
    c = excb.spherical_kmeans(x, 6, 20, 5, g)
    sim = c @ centres.t()
    assert (sim.max(1).values > 0.99).all() and len(set(sim.argmax(1).tolist())) == 6


def _tiny_model(extra=()):
    argv = [*TINY_ARGS["excb.py"], *extra]
    import tyro

    args = tyro.cli(excb.Args, args=argv)
    return args, excb.Model(args, lt_data.build_data(args))


def test_model_state_and_centroid_gradients_only_through_projector_pairs():
    args, model = _tiny_model()
    keys = model.state_dict().keys()
    assert "sizes" in keys and "centroids_initialised" in keys and "teacher.centroids" in keys
    assert any(k.startswith("teacher.backbone.") for k in keys)
    assert model.sizes.dtype == torch.float32 and torch.allclose(model.sizes, torch.full((16,), 1 / 16))
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert "predictor" not in "".join(k for k in keys if k.startswith("teacher."))
    g, loc = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 8, 8)
    proj, pred = model(g, loc)
    assert proj.shape == (8, 16) and pred.shape == (16, 16) and proj.abs().max() <= 1 + 1e-5
    pred.sum().backward(retain_graph=True)  # predictor path: no gradient to the centroids
    assert model.student.centroids.grad is None or not model.student.centroids.grad.any()
    assert model.predictor[1][0].weight.grad.abs().sum() > 0 and model.student.projector[0].weight.grad is not None
    proj.sum().backward()
    assert model.student.centroids.grad.abs().sum() > 0
    decay, no_decay, cent = model.parameter_groups()
    assert len(cent) == 1 and cent[0] is model.student.centroids
    assert sum(p.numel() for p in decay + no_decay + cent) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_no_predictor_pairs_locals_through_the_projector():
    _, model = _tiny_model(["--no-predictor"])
    assert model.predictor is None
    proj, local = model(torch.randn(8, 3, 16, 16), torch.randn(8, 3, 8, 8))
    assert proj.shape == (8, 16) and local.shape == (8, 16)


def test_smoke_run_checkpoint_holds_the_method_state(tmp_path):
    run_script(
        "excb.py",
        *TINY_ARGS["excb.py"],
        "--batch-size",
        "8",
        "--max-steps",
        "4",
        "--epochs",
        "2",
        "--num-workers",
        "0",
        "--run-name",
        "s",
        "--amp",
        "none",
        cwd=tmp_path,
    )
    m = torch.load(tmp_path / "runs" / "s" / "checkpoint.pt", weights_only=True)["model"]
    assert bool(m["centroids_initialised"])
    assert m["sizes"].dtype == torch.float32 and m["sizes"].sum().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(m["sizes"], torch.full((16,), 1 / 16))  # updated after each step
    assert not torch.equal(m["teacher.centroids"], m["student.centroids"])  # EMA, not a copy
    # teacher is an EMA of the student: it moved from its start but lags behind
    w_t, w_s = m["teacher.projector.0.weight"], m["student.projector.0.weight"]
    assert not torch.equal(w_t, w_s)


# --------------------------------------------------------------------------- the ViT option, the schedules

VIT = ["--arch", "vit_tiny", "--vit-layers", "2", "--vit-dim", "32", "--vit-heads", "2"]


def test_vit_option_follows_the_official_vit_recipe():
    args, model = _tiny_model(VIT)
    assert model.backbone_spec == {
        "arch": "vit",
        "arch_kwargs": dict(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=128),
    }
    # student: stochastic depth up to 0.1 in its last block; teacher: none
    assert [b.drop_path for b in model.student.backbone.encoder.layers] == [0.0, 0.1]
    assert [b.drop_path for b in model.teacher.backbone.encoder.layers] == [0.0, 0.0]
    # projector and predictor MLPs without BatchNorm, GELU (the predictor keeps its input BatchNorm)
    kinds = [type(m).__name__ for m in model.student.projector]
    assert kinds == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert [type(m).__name__ for m in model.predictor[1]] == ["Linear", "GELU", "Linear"]
    # AdamW, lr 5e-4 per 256 and weight decay 0.04 -> 0.4 by default (official 2e-3 per 1024, 0.04 -> 0.4)
    assert (args.lr, args.weight_decay, args.final_weight_decay) == (5e-4, 0.04, pytest.approx(0.4))
    assert isinstance(excb.make_optimizer(args, model, 1e-3), torch.optim.AdamW)
    # 16 px global and 8 px local crops (2x2 patches) go through the same ViT
    proj, pred = model(torch.randn(4, 3, 16, 16), torch.randn(8, 3, 8, 8))
    assert proj.shape == (4, 16) and pred.shape == (12, 16)
    r_args, r_model = _tiny_model()
    assert (r_args.lr, r_args.weight_decay, r_args.final_weight_decay) == (0.15, 1e-4, 1e-4)
    assert isinstance(excb.make_optimizer(r_args, r_model, 0.1), torch.optim.SGD)


def test_crop_scale_follows_the_official_cosine_and_reaches_the_workers():
    args, _ = _tiny_model(["--epochs", "10"])
    assert [round(excb.crop_split(args, e), 6) for e in (0, 5, 10)] == [0.26, 0.2, 0.14]
    # the official formula: min + (max - min) (1 + cos(pi e / E)) / 2
    assert excb.crop_split(args, 3) == pytest.approx(0.14 + 0.06 * (1 + math.cos(math.pi * 0.3)))
    data = lt_data.build_data(args)
    ds = lt_data.IndexedDataset(data.train_full, data.lt_indices, excb.train_transform(args, data))
    sampler = lt_data.ResumableSampler(len(ds), seed=0)
    loader = lt_data.make_loader(ds, 4, 2, sampler)  # persistent workers: built once, told the epoch per sample
    for epoch in (0, 7):
        sampler.set_epoch(epoch)
        views, _, _ = next(iter(loader))
        assert [v.shape[-1] for v in views] == [16, 16, 8, 8]
    # what the workers applied: the transform's scales after a sample of epoch 7
    ds[(0, 1, 7)]
    s = excb.crop_split(args, 7)
    assert ds.transform.crops.global_t.transforms[0].scale == (s, 1.0)
    assert ds.transform.crops.local_t.transforms[0].scale == (0.05, s)


def test_vit_run_resumes_and_exports_a_torchvision_vision_transformer(tmp_path):
    import torchvision

    from linear_probe import load_backbone

    common = [
        *TINY_ARGS["excb.py"],
        *VIT,
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--num-workers",
        "0",
        "--run-name",
        "v",
    ]
    run_script("excb.py", *common, "--max-steps", "3", cwd=tmp_path)
    run_script("excb.py", *common, cwd=tmp_path)  # resumes to the end
    ckpt = torch.load(tmp_path / "runs" / "v" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 * (len(lt_data.build_data(_tiny_model()[0]).lt_indices) // 8)
    export = torch.load(tmp_path / "runs" / "v" / "backbone.pt", weights_only=True)
    tv = torchvision.models.VisionTransformer(**export["backbone"]["arch_kwargs"])
    tv.heads = torch.nn.Identity()
    tv.load_state_dict(export["state_dict"], strict=True)
    ours, _ = load_backbone(str(tmp_path / "runs" / "v" / "backbone.pt"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), tv.eval()(x), atol=1e-5, rtol=1e-5)


def test_vit_flags_are_refused_for_a_resnet(tmp_path):
    proc = run_script(
        "excb.py", *TINY_ARGS["excb.py"], "--batch-size", "8", "--vit-layers", "2", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2 and "apply to ViTs, not --arch resnet18" in proc.stderr.strip().splitlines()[-1]


def test_vit_ddp_step_matches_one_process_at_twice_the_batch(tmp_path):
    """The ViT path is as global as the ResNet one: 2 processes x 8 == 1 x 16 after one step (no drop path, which
    draws per-process masks; the ViT has no BatchNorm, the heads' BatchNorm uses running statistics: test seam)."""
    from conftest import run_torchrun

    seams = ("--bn-running-stats",)
    args = [*TINY_ARGS["excb.py"], *VIT, "--drop-path", "0", "--max-steps", "1", "--num-workers", "0", "--amp", "none"]
    run_torchrun("excb.py", *args, "--batch-size", "8", "--run-name", "two", cwd=tmp_path, seams=seams)
    run_script("excb.py", *args, "--batch-size", "16", "--run-name", "one", cwd=tmp_path, seams=seams)
    one, two = (torch.load(tmp_path / "runs" / r / "checkpoint.pt", weights_only=True)["model"] for r in ("one", "two"))
    assert not torch.allclose(one["sizes"], torch.full_like(one["sizes"], 1 / 16))  # a step ran and moved s
    for k, v in one.items():
        if v.is_floating_point():
            torch.testing.assert_close(two[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--crop-scale", "0.01", "0.5"], "--crop-scale must be in (0.05, 1), got 0.01"),
        (["--arch", "vit_tiny", "--drop-path", "1.0"], "--drop-path must be in [0, 1), got 1.0"),
        (["--teacher-temp", "0"], "--teacher-temp must be > 0, got 0.0"),
        (["--kmeans-samples", "0"], "--kmeans-samples must be >= 1, got 0"),
        (["--kmeans-iters", "0"], "--kmeans-iters must be >= 1, got 0"),
        (["--kmeans-restarts", "-1"], "--kmeans-restarts must be >= 1, got -1"),
    ],
)
def test_bad_method_flags_one_clear_line(tmp_path, extra, message):
    proc = run_script("excb.py", *TINY_ARGS["excb.py"], "--batch-size", "8", *extra, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"excb.py: error: {message}"]


# ------------------------------------------------------------------ k-means initialisation: split across processes

# 800 balanced 8 px images; no channels-last and fp32, so that every process computes bit for bit the same
KMEANS_DATA = ["--synthetic-per-class", "200", "--imbalance-ratio", "1", "--image-size", "8"]
KMEANS_DATA += ["--no-channels-last", "--amp", "none", "--eval-every", "0"]


def test_kmeans_chunks_are_256_images_and_a_last_single_image_joins_the_previous_chunk():
    def pairs(n):
        return [(c.start, c.stop) for c in excb.kmeans_chunks(n)]

    assert pairs(3) == [(0, 3)]
    assert pairs(512) == [(0, 256), (256, 512)]
    assert pairs(513) == [(0, 256), (256, 513)]  # BatchNorm in train mode refuses a batch of one image
    assert pairs(600) == [(0, 256), (256, 512), (512, 600)]


def _init_run(extra=()):
    """A Run as ``train`` builds it (seed 0's weights, the training set) on KMEANS_DATA."""
    import tyro

    args = tyro.cli(excb.Args, args=[*TINY_ARGS["excb.py"], *KMEANS_DATA, *extra])
    data = lt_data.build_data(args)
    torch.manual_seed(0)
    model = excb.Model(args, data)
    train_set = lt_data.IndexedDataset(data.train_full, data.pretrain_indices(False), excb.train_transform(args, data))
    return excb.RunState(args, model, model, excb.make_optimizer(args, model, 0.1), data, train_set)


def _init_centroids(run):
    """excb.init_centroids(run); returns the features it clustered and the student's and teacher's centroids."""
    features, embed = [], excb.embed_for_kmeans
    excb.embed_for_kmeans = lambda run, pick: features.append(embed(run, pick)) or features[0]
    try:
        excb.init_centroids(run)
    finally:
        excb.embed_for_kmeans = embed
    return features[0], run.model.student.centroids.detach().clone(), run.model.teacher.centroids.clone()


def _kmeans_init_worker(rank, world, init_file, samples, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for n in samples:
            torch.save(
                _init_centroids(_init_run(["--kmeans-samples", str(n), "--num-workers", "1"])), f"{out}.{n}.{rank}"
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # torchrun, 2 processes: 116 s on 2 shared cores
def test_kmeans_init_on_two_gloo_processes_equals_one_process(tmp_path):
    """Each process embeds every other chunk of 256 images through its DataLoader; the gathered features, and so the
    centroids, are bit for bit those of one process embedding the chunks in turn without a DataLoader (by hand
    here), on both ranks. 513 images: rank 1's one chunk (257 images) is longer than rank 0's; 600: rank 0 has two
    chunks (344 images), rank 1 one."""
    import copy

    cases = {513: [0, 256, 513], 600: [0, 256, 512, 600]}  # the chunk bounds one process uses
    mp.spawn(_kmeans_init_worker, args=(2, str(tmp_path / "init"), list(cases), str(tmp_path / "k")), nprocs=2)
    torch.set_num_threads(1)
    for n, bounds in cases.items():
        run = _init_run(["--kmeans-samples", str(n), "--num-workers", "2"])
        g = torch.Generator().manual_seed(run.args.seed)
        pick = torch.randperm(len(run.train_set), generator=g)[:n].sort().values.tolist()
        view = lt_data.eval_transform(8, run.data.mean, run.data.std)
        images = [view(run.train_set.images.image(run.train_set.indices[j])) for j in pick]
        teacher = copy.deepcopy(run.model.teacher).train()
        with torch.no_grad():
            hand = torch.cat([teacher.project(torch.stack(images[a:b])) for a, b in zip(bounds, bounds[1:])])
        centroids = excb.spherical_kmeans(hand, 16, run.args.kmeans_iters, run.args.kmeans_restarts, g)
        assert not torch.allclose(centroids, run.model.teacher.centroids)  # the initialisation changes them
        rng, state = torch.get_rng_state(), copy.deepcopy(run.model.teacher.state_dict())
        one = _init_centroids(run)  # one process, 2 DataLoader workers
        assert torch.equal(torch.get_rng_state(), rng)  # the loader drew nothing from the global RNG
        for k, v in run.model.teacher.state_dict().items():  # the teacher's BatchNorm statistics did not move
            assert k == "centroids" or torch.equal(v, state[k]), k
        for rank, (features, student, teacher) in enumerate([one, *(_load_both(tmp_path, n))]):
            assert features.shape == (n, 32) and torch.equal(features, hand), (n, rank)
            assert torch.equal(student, centroids) and torch.equal(teacher, centroids), (n, rank)


def _load_both(tmp_path, n):
    return [torch.load(tmp_path / f"k.{n}.{rank}", weights_only=True) for rank in (0, 1)]


def test_sync_batchnorm_is_converted_back_to_plain_batchnorm_for_the_kmeans_pass():
    """--sync-bn makes every BatchNorm of the model a SyncBatchNorm, the teacher's included, whose train-mode forward
    all-gathers statistics: in the k-means pass each rank embeds other chunks, so those all-gathers hung or mixed
    chunks. The pass's teacher copy gets plain BatchNorm back: the modules of the never-converted model, the same
    parameters, the same outputs and statistics. (SyncBatchNorm has no train-mode forward on CPU: the conversion is
    tested directly.)"""
    import copy

    import torch.nn as nn

    _, model = _tiny_model()
    plain = copy.deepcopy(model.teacher).train()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model.teacher)).train()
    kinds = {name: type(m) for name, m in plain.named_modules()}
    assert (
        sum(k is nn.BatchNorm2d for k in kinds.values()) > 10 and sum(k is nn.BatchNorm1d for k in kinds.values()) == 2
    )
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == sum(
        k in (nn.BatchNorm1d, nn.BatchNorm2d) for k in kinds.values()
    )
    weight, mean = synced.backbone.bn1.weight, synced.projector[1].running_mean
    back = excb.without_sync_batchnorm(synced)
    assert {name: type(m) for name, m in back.named_modules()} == kinds  # no SyncBatchNorm left
    assert back.backbone.bn1.weight is weight and back.projector[1].running_mean is mean  # shared, not copied
    assert all(m.training for m in back.modules())
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back.project(x), plain.project(x), rtol=0, atol=0)
    for k, v in plain.state_dict().items():  # running statistics updated alike
        assert torch.equal(back.state_dict()[k], v), k


def test_kmeans_init_of_257_images_takes_a_last_chunk_of_one_image_and_reports_itself(tmp_path):
    """The k-means features come from the teacher in train mode in chunks of 256: 257 images left a chunk of one,
    which BatchNorm refuses (a ValueError traceback before step 1). The pass says what it does, then how long it
    took."""
    args = [*TINY_ARGS["excb.py"], *KMEANS_DATA, "--kmeans-samples", "257", "--batch-size", "8", "--max-steps", "1"]
    out = run_script("excb.py", *args, "--num-workers", "2", cwd=tmp_path).stdout
    lines = [line for line in out.splitlines() if line.startswith("k-means")]
    assert lines[0] == "k-means initialisation: embedding 257 training images on 1 process x 2 data-loading workers"
    done = (
        r"k-means initialisation done in \d+ s: 257 images embedded at \d+ img/s on 1 x cpu, 16 centroids in [\d.]+ s"
    )
    assert len(lines) == 2 and re.fullmatch(done, lines[1]), lines  # one chunk: no progress line
    assert "done: step 1" in out


def test_kmeans_init_under_torchrun_reports_from_rank_0(tmp_path):
    """2 processes, 600 images: rank 0 embeds chunks 0 and 2 (344 images), rank 1 chunk 1; rank 0 alone prints the
    start line, a progress line after its first chunk, and the closing line."""
    from conftest import run_torchrun

    args = [*TINY_ARGS["excb.py"], *KMEANS_DATA, "--kmeans-samples", "600", "--batch-size", "8", "--max-steps", "1"]
    out = run_torchrun("excb.py", *args, "--num-workers", "1", cwd=tmp_path).stdout
    lines = [line for line in out.splitlines() if line.startswith("k-means")]
    assert len(lines) == 3, lines
    assert lines[0] == "k-means initialisation: embedding 600 training images on 2 processes x 1 data-loading workers"
    assert re.fullmatch(
        r"k-means initialisation: 256/344 images on rank 0, \d+ img/s per process, eta \d+m\d\ds", lines[1]
    )
    assert re.fullmatch(
        r"k-means initialisation done in \d+ s: 600 images embedded at \d+ img/s on 2 x cpu, .*", lines[2]
    )
    assert "done: step 1" in out


def test_stop_signals_during_the_pass_reach_the_run_s_handler_between_chunks():
    """Inside StopsBetweenChunks a signal is only noted; pass_on() (and leaving) hands it to the handler it replaced,
    which is back in place afterwards."""
    got = []
    run_handler = lambda signum, _: got.append(signum)  # noqa: E731
    previous = signal.signal(signal.SIGTERM, run_handler)
    try:
        with excb.StopsBetweenChunks() as stops:
            signal.raise_signal(signal.SIGTERM)
            assert got == [] and stops.noted == [signal.SIGTERM]
            stops.pass_on()
            assert got == [signal.SIGTERM] and stops.noted == []
            signal.raise_signal(signal.SIGTERM)
            assert got == [signal.SIGTERM]
        assert got == [signal.SIGTERM, signal.SIGTERM]  # on leaving
        assert signal.getsignal(signal.SIGTERM) is run_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("signum,to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_stop_signal_during_the_kmeans_init_stops_the_run_at_once(tmp_path, signum, to_group):
    """SIGTERM (to the process) or Ctrl-C (SIGINT to its process group, DataLoader workers included) once the k-means
    pass has started stops the run during the pass, which has ten chunks to embed: exit 128 + signal, one line that
    says so, no traceback, no checkpoint (none is due before the first step). A stop raised inside the DataLoader
    used to leave a worker's traceback (it cut a hand-over of shared memory), and a Ctrl-C that reached a worker not
    yet in its own process group killed it."""
    args = [*TINY_ARGS["excb.py"], "--synthetic-per-class", "640", "--imbalance-ratio", "1", "--image-size", "64"]
    args += ["--kmeans-samples", "2560", "--batch-size", "8", "--num-workers", "2", "--eval-every", "0"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "excb.py"), *args, "--run-name", "stop"],
        cwd=tmp_path,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    before = []
    for line in proc.stdout:
        before.append(line)
        if line.startswith("k-means initialisation: embedding"):
            os.killpg(proc.pid, signum) if to_group else proc.send_signal(signum)
            break
    try:
        out, err = proc.communicate(timeout=HANG_GUARD)  # it stops once the chunk it is embedding is done
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the run did not stop within 120 s of the signal")
    said = "".join(before) + out + err
    assert proc.returncode == 128 + signum and err == "", said
    assert "k-means initialisation done" not in said, said  # stopped during the pass
    stopped = [line for line in said.splitlines() if "interrupted" in line]
    assert len(stopped) == 1 and stopped[0].startswith(f"interrupted ({signal.Signals(signum).name}) before the first")
    assert not (tmp_path / "runs" / "stop" / "checkpoint.pt").exists()


def test_local_crops_are_96_px_at_imagenet_sizes_and_half_the_image_at_cifar_sizes():
    """ExCB's official ImageNet views are 2 x 224 + 6 x 96; its CIFAR setting 2 x 32 + 6 x 16 (specs/excb.md)."""
    import types

    import tyro

    for size, expected in ((224, 96), (112, 96), (96, 48), (32, 16), (8, 8)):
        args = tyro.cli(excb.Args, args=["--image-size", str(size)])
        assert excb.local_size(args, types.SimpleNamespace(image_size=size)) == expected
    args = tyro.cli(excb.Args, args=["--local-size", "64"])
    assert excb.local_size(args, types.SimpleNamespace(image_size=224)) == 64


def test_init_cost_benchmark_reports_the_embedding_rate_of_each_run(tmp_path):
    """benchmarks/excb_init_cost.py: one row per (size, workers, processes), the rate read from excb.py's own
    closing line of the pass."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "excb_init_cost.py"), "--sizes", "8", "--samples", "257"]
    cmd += ["--workers", "0", "--processes", "1", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 8 px")]
    assert len(rows) == 1 and re.fullmatch(r"\| 8 px \| 0 \| 1 \| [1-9]\d* \|", rows[0]), proc.stdout
