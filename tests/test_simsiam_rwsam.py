"""simsiam_rwsam.py: the loss, the (A)SAM step, the re-weighting and the KDE against hand computations.

The subprocess smoke run with kill/resume and the 2-process torchrun run are in tests/test_scripts.py
(parametrised over conftest.TINY_ARGS).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lt_data
import simsiam_rwsam as ss
from conftest import TINY_DATA

# ------------------------------------------------------------------ the loss


def _neg_cos(a, b):
    return -sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))


@pytest.mark.parametrize("weighted", [False, True])
def test_loss_matches_a_hand_computation_and_stops_the_gradient(weighted):
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    w = torch.rand(5, generator=g, dtype=torch.float64) * 3 if weighted else None
    ww = w.tolist() if weighted else [1.0] * 5
    P1, P2, Z1, Z2 = (t.tolist() for t in (p1, p2, z1, z2))
    expected = (
        0.5 * sum(ww[i] * _neg_cos(P1[i], Z2[i]) for i in range(5)) / 5
        + 0.5 * sum(ww[i] * _neg_cos(P2[i], Z1[i]) for i in range(5)) / 5
    )
    loss = ss.simsiam_loss(p1, p2, z1, z2, w)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient on the targets
    assert p1.grad is not None and p1.grad.abs().sum() > 0


def test_uniform_weights_equal_no_weights_and_only_relative_size_changes_direction():
    g = torch.Generator().manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(6, 4, generator=g) for _ in range(4))
    assert ss.simsiam_loss(p1, p2, z1, z2, torch.ones(6)) == ss.simsiam_loss(p1, p2, z1, z2)


# ------------------------------------------------------------------ the (A)SAM step


def _tiny_run(tmp_path, **overrides):
    argv = dict(
        dataset="synthetic",
        synthetic_classes=4,
        synthetic_per_class=32,
        synthetic_test_per_class=8,
        image_size=8,
        imbalance_ratio=4.0,
        proj_dim=16,
        pred_dim=8,
        batch_size=4,
        epochs=1,
        amp="none",
        channels_last=False,
        num_workers=0,
        lr=0.5,
        weight_decay=5e-4,
        rho=0.5,
        reweight="kde",
    )
    scaled = overrides.pop("_scaler", False)
    argv.update(overrides)
    args = ss.Args(**argv)
    data = lt_data.build_data(args)
    train_set = lt_data.IndexedDataset(data.train_full, data.pretrain_indices(False), ss.train_transform(args, data))
    torch.manual_seed(0)
    model = ss.Model(args, data)
    lr = args.lr * args.batch_size / 256
    opt = ss.make_optimizer(args, model, lr)
    run = ss.RunState(
        args=args,
        data=data,
        train_set=train_set,
        model=model,
        train_model=model,
        optimizer=opt,
        steps_per_epoch=10,
        run_dir=str(tmp_path),
    )
    run.scaler = torch.amp.GradScaler("cpu", enabled=scaled)  # a GradScaler with fp32 compute: only scaling differs
    model.train()
    return run, lr


def _batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g)],
        torch.zeros(n, dtype=torch.long),
        torch.tensor([0, 5, 40, 70][:n]),
    ]


def _hand_loss(model, x1, x2, w):
    """The SimSiam loss written out: 1/2 mean w D(p1, sg z2) + 1/2 mean w D(p2, sg z1), D = -cos."""
    z1, z2 = model.projector(model.backbone(x1)), model.projector(model.backbone(x2))
    p1, p2 = model.predictor(z1), model.predictor(z2)
    t1, t2 = z1.detach(), z2.detach()
    d1 = -(p1 * t2).sum(1) / (p1.norm(dim=1) * t2.norm(dim=1))
    d2 = -(p2 * t1).sum(1) / (p2.norm(dim=1) * t1.norm(dim=1))
    return 0.5 * (w * d1).sum() / len(w) + 0.5 * (w * d2).sum() / len(w)


@pytest.mark.parametrize("sam", ["asam", "sam"])
def test_one_sam_step_equals_the_four_steps_by_hand(tmp_path, sam):
    run, lr = _tiny_run(tmp_path, sam=sam)
    run.model.double()  # fp64: the perturbed pass amplifies fp32 rounding (batch-4 BatchNorm at 1x1 px)
    run.optimizer = ss.make_optimizer(run.args, run.model, lr)
    weights = (
        torch.rand(len(run.model.sample_weights), generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.2
    )
    run.model.sample_weights.copy_(weights)
    batch = _batch()
    batch[0] = [x.double() for x in batch[0]]
    (x1, x2), _, idx = batch
    ref = copy.deepcopy(run.model)  # the hand computation works on copies
    names = [n for n, p in ref.named_parameters()]
    theta = {n: p.detach().clone() for n, p in ref.named_parameters()}
    # 1. gradient of the weighted loss at theta
    g = torch.autograd.grad(_hand_loss(ref, x1, x2, weights[idx]), list(ref.parameters()), allow_unused=True)
    g = {n: (torch.zeros_like(theta[n]) if gi is None else gi) for n, gi in zip(names, g)}
    bn_after_first = {k: v.clone() for k, v in ref.state_dict().items() if "running" in k or "num_batches" in k}
    # 2. ascent
    if sam == "asam":
        s = math.sqrt(sum(float(((theta[n].abs() * g[n]) ** 2).sum()) for n in names))
        e = {n: 0.5 * theta[n] ** 2 * g[n] / (s + 1e-12) for n in names}
    else:
        s = math.sqrt(sum(float((g[n] ** 2).sum()) for n in names))
        e = {n: 0.5 * g[n] / (s + 1e-12) for n in names}
    # 3. unweighted gradient at theta + e
    perturbed = copy.deepcopy(ref)
    with torch.no_grad():
        for n, p in perturbed.named_parameters():
            p.copy_(theta[n] + e[n])
    g2 = torch.autograd.grad(
        _hand_loss(perturbed, x1, x2, torch.ones(4)), list(perturbed.parameters()), allow_unused=True
    )
    # 4. SGD (first step: momentum buffer = gradient + weight decay) at theta
    expected = {
        n: theta[n] - lr * ((torch.zeros_like(theta[n]) if gi is None else gi) + 5e-4 * theta[n])
        for n, gi in zip(names, g2)
    }

    out = ss.train_step(run, batch)
    out.update(ss.diagnostics(run, out))  # the charts of a log step
    got = dict(run.model.named_parameters())
    moved = 0.0
    for n in names:
        torch.testing.assert_close(got[n].detach(), expected[n], rtol=0, atol=1e-6, msg=lambda m: f"{n}: {m}")
        moved = max(moved, float((expected[n] - theta[n]).abs().max()))
    assert moved > 1e-4  # the step did something measurable
    e_norm = math.sqrt(sum(float((v**2).sum()) for v in e.values()))
    assert out["charts/perturbation_norm"].item() == pytest.approx(e_norm, rel=1e-4)
    state = run.model.state_dict()  # BatchNorm keeps the first (unperturbed) pass's statistics
    for k, v in bn_after_first.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)


def _update(tmp_path, weights=None, **overrides):
    run, _ = _tiny_run(tmp_path, **overrides)
    if weights is not None:
        run.model.sample_weights.copy_(weights)
    before = [p.detach().clone() for p in run.model.parameters()]
    ss.train_step(run, _batch())
    return [p.detach() - b for p, b in zip(run.model.parameters(), before)]


def test_weights_change_the_update_and_uniform_weights_equal_reweight_none(tmp_path):
    n = 72
    none = _update(tmp_path, reweight="none")
    uniform = _update(tmp_path, torch.ones(n), reweight="kde")
    skewed = _update(tmp_path, torch.linspace(0.1, 5.0, n), reweight="kde")
    for a, b in zip(none, uniform):
        assert torch.equal(a, b)
    diff = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(none, skewed)))
    size = math.sqrt(sum(float((a**2).sum()) for a in none))
    assert diff > 1e-3 * size
    plain = _update(tmp_path, reweight="none", sam="none")  # and the perturbation itself changes the update
    diff = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(none, plain)))
    assert diff > 1e-3 * size


def test_fp16_style_scaled_first_pass_is_unscaled_by_hand(tmp_path):
    """With a GradScaler the first pass's gradients are unscaled by hand: a power-of-two scale must give the
    same perturbation and update as no scaler (fp32 compute, so only the scaling differs)."""
    plain = _update(tmp_path, torch.linspace(0.1, 5.0, 72))
    scaled = _update(tmp_path, torch.linspace(0.1, 5.0, 72), _scaler=True)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_step_runs_and_is_finite(tmp_path):
    upd = _update(tmp_path, amp="bf16")
    assert all(torch.isfinite(u).all() for u in upd) and any(u.abs().sum() > 0 for u in upd)


# ------------------------------------------------------------------ KDE weights


def _hand_kde(f, h, alpha, max_ratio):
    f = [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in f.tolist()]
    n = len(f)
    p = []
    for i in range(n):
        ks = [math.exp(-sum((a - b) ** 2 for a, b in zip(f[i], f[j])) / (2 * h * h)) for j in range(n) if j != i]
        p.append(sum(ks) / len(ks))
    w = [q ** (-alpha) for q in p]
    cap = min(w) * max_ratio
    w = [min(x, cap) for x in w]
    m = sum(w) / n
    return [x / m for x in w]


@pytest.mark.parametrize("alpha,max_ratio", [(1.0, 1e6), (0.5, 1e6), (1.0, 1.5)])
def test_kde_weights_match_a_hand_computation(alpha, max_ratio):
    f = torch.randn(7, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    f[:3] = f[0] + 0.05 * f[:3]  # a little cluster, so the weights differ
    got = ss.kde_weights(f, bandwidth=0.5, alpha=alpha, max_ratio=max_ratio)
    expected = torch.tensor(_hand_kde(f, 0.5, alpha, max_ratio), dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert got.max() / got.min() <= max_ratio * (1 + 1e-5)


def test_sparse_points_get_larger_weights_than_a_dense_cluster():
    g = torch.Generator().manual_seed(5)
    dense = torch.tensor([1.0, 0, 0, 0]) + 0.05 * torch.randn(60, 4, generator=g)
    sparse = torch.randn(6, 4, generator=g)
    w = ss.kde_weights(torch.cat([dense, sparse]), bandwidth=0.3, max_ratio=100.0)
    assert w[60:].min() > 3 * w[:60].max()


def test_chunked_equals_unchunked_and_a_reference_subset_is_close():
    g = torch.Generator().manual_seed(6)
    centres = torch.randn(5, 16, generator=g)
    labels = torch.arange(2000) % 5
    labels[labels == 4] = torch.randint(0, 4, (int((labels == 4).sum()),), generator=g)
    labels[:40] = 4  # class 4 is rare
    f = centres[labels] + 0.4 * torch.randn(2000, 16, generator=g)
    full = ss.kde_weights(f, bandwidth=0.6, max_ratio=50.0, chunk_size=100000)
    chunked = ss.kde_weights(f, bandwidth=0.6, max_ratio=50.0, chunk_size=97)
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-5)
    ref = torch.randperm(2000, generator=g)[:500]
    sub = ss.kde_weights(f, bandwidth=0.6, max_ratio=50.0, reference=ref, chunk_size=128)
    assert ((sub - full).abs() / full).mean() < 0.08  # a quarter of the points: about 4% off on average
    assert torch.corrcoef(torch.stack([sub, full]))[0, 1] > 0.98
    assert full[:40].mean() > 2 * full[40:].mean()  # and the rare class is up-weighted


def test_default_reference_is_every_image_up_to_the_cap_then_a_seeded_subset_of_the_cap():
    cap = ss.KDE_AUTO_REFERENCE
    assert cap == 2**20  # what --help and docs/simsiam_rwsam.md promise
    assert ss.kde_reference_indices(cap, 0, seed=1, epoch=10) is None  # ImageNet-LT, iNaturalist: exact
    big = ss.kde_reference_indices(cap + 1000, 0, seed=1, epoch=10)  # a fake N just above the cap
    assert big is not None and big.dtype == torch.int64 and big.shape == (cap,)
    assert torch.equal(big, big.unique()) and 0 <= int(big[0]) and int(big[-1]) < cap + 1000  # sorted, distinct
    assert torch.equal(big, ss.kde_reference_indices(cap + 1000, 0, seed=1, epoch=10))  # every rank, a resume
    assert not torch.equal(big, ss.kde_reference_indices(cap + 1000, 0, seed=1, epoch=20))  # a new draw per update
    assert not torch.equal(big, ss.kde_reference_indices(cap + 1000, 0, seed=2, epoch=10))
    # an explicit --kde-reference M is used below N, at any N; M >= N means every image
    assert ss.kde_reference_indices(1000, 100, seed=1, epoch=0).shape == (100,)
    assert ss.kde_reference_indices(1000, 1000, seed=1, epoch=0) is None
    # uniform: over 400 updates each of 1,000 images is drawn 40 times on average (binomial sd 6)
    hits = torch.bincount(torch.cat([ss.kde_reference_indices(1000, 100, 1, e) for e in range(400)]), minlength=1000)
    assert 10 < hits.min() and hits.max() < 70 and hits.float().mean() == 40


def test_the_epoch_hook_uses_the_default_subset_above_the_cap(tmp_path, monkeypatch, capsys):
    """on_epoch_start with --kde-reference 0: the exact KDE at N = the cap, a seeded subset of the cap above it."""
    run, _ = _tiny_run(tmp_path, reweight_warmup=0, reweight_every=1)
    n = len(run.train_set)
    feats = ss.backbone_features(run, 0, n)
    monkeypatch.setattr(ss, "KDE_AUTO_REFERENCE", n)
    ss.on_epoch_start(run, 0)
    exact = run.model.sample_weights.clone()
    torch.testing.assert_close(exact, ss.kde_weights(feats, 0.3), rtol=1e-5, atol=1e-6)
    assert f"KDE weights of {n} images against every other image" in capsys.readouterr().out
    monkeypatch.setattr(ss, "KDE_AUTO_REFERENCE", n // 2)
    ss.on_epoch_start(run, 1)
    ref = torch.randperm(n, generator=torch.Generator().manual_seed(run.args.seed * 7919 + 1))[: n // 2].sort().values
    torch.testing.assert_close(run.model.sample_weights, ss.kde_weights(feats, 0.3, reference=ref), rtol=1e-5, atol=0)
    assert not torch.allclose(run.model.sample_weights, exact, rtol=1e-3)
    assert f"against a subset of {n // 2} in" in capsys.readouterr().out


def test_a_reference_subset_errs_as_a_monte_carlo_estimate_of_the_full_kde():
    """The subset's weights against the full KDE's (dense float64 kernel matrix here, not the chunked code) on
    clustered features, 3,000 points, M = 750. Independently of the code, p_i = mean_j k_ij over M of the N - 1 other
    points drawn without replacement has relative sd s_i = sqrt((1 - M/(N-1)) / M) std_j k_ij / mean_j k_ij, and
    without clipping w_i ~ 1/p_i has the same relative error to first order. So the errors over s_i must have an rms
    near 1 (over seeds 0-4 of the draw: 0.78 to 1.20; errors of neighbours are correlated, hence the spread: the band
    is 0.6 to 1.4), no point beyond 5 s_i (seen: at most 4.0), and the rare cluster errs most (its s is largest)."""
    g = torch.Generator().manual_seed(8)
    n, m, h, sizes = 3000, 750, 0.5, torch.tensor([1800, 900, 250, 50])
    labels = torch.repeat_interleave(torch.arange(4), sizes)
    centres = torch.nn.functional.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=1)
    f = torch.nn.functional.normalize(centres[labels] + 0.35 * torch.randn(n, 8, generator=g, dtype=torch.float64))
    k = torch.exp(-torch.cdist(f, f).pow(2) / (2 * h * h))[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)
    p = k.mean(1)
    s = math.sqrt((1 - m / (n - 1)) / m) * k.std(1, correction=0) / p
    full = (1 / p) / (1 / p).mean()
    sub = ss.kde_weights(f, h, max_ratio=1e9, reference=ss.kde_reference_indices(n, m, seed=1, epoch=0)).double()
    err = sub / full - 1
    assert 0.6 < (err / s).pow(2).mean().sqrt() < 1.4
    assert (err.abs() / s).max() < 5
    assert err[labels == 3].abs().mean() > 2 * err[labels == 0].abs().mean()


def test_label_weights_are_base_to_the_frequency_rank():
    labels = [2, 2, 2, 0, 0, 1, 1, 1, 1, 3]  # frequency ranks: class 1 -> 0, 2 -> 1, 0 -> 2, 3 -> 3
    raw = [1.2 ** {1: 0, 2: 1, 0: 2, 3: 3}[y] for y in labels]
    expected = torch.tensor([r / (sum(raw) / len(raw)) for r in raw])
    torch.testing.assert_close(ss.label_weights(labels, 4, 1.2), expected)


def _sharded_worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(7)
        f = torch.randn(37, 8, generator=g)
        ref = torch.randperm(37, generator=g)[:20]
        start, stop, _ = ss.shard_bounds(37, rank, world)
        out = {
            "all": ss.sharded_kde_weights(f[start:stop], 37, 0.5, max_ratio=20.0, chunk_size=5),
            "sub": ss.sharded_kde_weights(f[start:stop], 37, 0.5, max_ratio=20.0, reference=ref, chunk_size=5),
        }
        torch.save(out, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sharded_kde_under_two_gloo_processes_equals_one_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_worker, args=(2, port, str(tmp_path / "w")), nprocs=2, join=True)
    g = torch.Generator().manual_seed(7)
    f = torch.randn(37, 8, generator=g)
    ref = torch.randperm(37, generator=g)[:20]
    expected = {
        "all": ss.kde_weights(f, 0.5, max_ratio=20.0),
        "sub": ss.kde_weights(f, 0.5, max_ratio=20.0, reference=ref),
    }
    r0, r1 = (torch.load(tmp_path / f"w.{r}", weights_only=True) for r in (0, 1))
    for k in expected:
        assert torch.equal(r0[k], r1[k])  # every rank has the same weights
        torch.testing.assert_close(r0[k], expected[k], rtol=1e-5, atol=1e-6)


def test_bad_method_flags_are_refused_in_one_line(tmp_path):
    from conftest import run_script

    proc = run_script(
        "simsiam_rwsam.py",
        *TINY_DATA,
        "--rho",
        "0",
        "--max-steps",
        "1",
        "--num-workers",
        "0",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "--rho must be > 0" in proc.stderr and "Traceback" not in proc.stderr


def test_skipped_ascent_steps_are_logged(tmp_path):
    """fp16 drops the perturbation of a step whose weighted pass overflowed; charts/ascent_skipped counts them
    (the fraction of the log interval's steps; 0 here, in bf16)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import TINY_ARGS, run_script

    run_script(
        "simsiam_rwsam.py",
        *TINY_ARGS["simsiam_rwsam.py"],
        "--batch-size",
        "8",
        "--max-steps",
        "2",
        "--log-every",
        "1",
        "--num-workers",
        "0",
        "--run-name",
        "s",
        cwd=tmp_path,
    )
    acc = EventAccumulator(str(tmp_path / "runs" / "s"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("charts/ascent_skipped")] == [(1, 0.0), (2, 0.0)]


def test_vit_option_trains_with_adamw_and_exports_a_vit(tmp_path):
    """--arch vit_tiny: AdamW without weight decay on biases and norms, the warm-up then cosine lr, and an export
    that load_backbone rebuilds as the ViT that was trained; ViT flags with a ResNet are refused before any file."""
    import linear_probe
    from conftest import run_script

    vit = [
        "--arch",
        "vit_tiny",
        "--vit-layers",
        "2",
        "--vit-dim",
        "32",
        "--vit-heads",
        "2",
        "--proj-dim",
        "32",
        "--pred-dim",
        "8",
        "--sam",
        "none",
    ]
    run_script(
        "simsiam_rwsam.py",
        *TINY_DATA,
        *vit,
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--max-steps",
        "3",
        "--num-workers",
        "0",
        "--run-name",
        "v",
        cwd=tmp_path,
    )
    ckpt = torch.load(tmp_path / "runs" / "v" / "checkpoint.pt", weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and "exp_avg" in ckpt["optimizer"]["state"][0]
    assert groups[0]["lr"] == pytest.approx(5e-4 * 8 / 256 * 3 / 9)  # 9 steps/epoch: the 3rd warm-up step's lr
    model, meta = linear_probe.load_backbone(str(tmp_path / "runs" / "v" / "backbone.pt"))
    assert meta["arch"] == "vit" and meta["arch_kwargs"]["num_layers"] == 2 and meta["arch_kwargs"]["hidden_dim"] == 32
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 32)
    proc = run_script(
        "simsiam_rwsam.py",
        *TINY_DATA,
        "--vit-dim",
        "32",
        "--batch-size",
        "8",
        "--max-steps",
        "1",
        "--run-name",
        "r",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "apply to ViTs, not --arch resnet18" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs" / "r").exists()


def test_projector_depth_follows_simsiam_imagenet_3_cifar_2_and_the_flag():
    """SimSiam (App. D): a 3-layer projection MLP on ImageNet, 2 layers on CIFAR; --proj-layers overrides."""
    import tyro

    def linear_layers(*flags):
        args = tyro.cli(ss.Args, args=[*flags, "--proj-dim", "16", "--pred-dim", "4"])
        data = lt_data.build_data(args)
        projector = ss.Model(args, data).projector
        layers = [m for m in projector if isinstance(m, torch.nn.Linear)]
        assert isinstance(projector[-1], torch.nn.BatchNorm1d) and not projector[-1].affine  # BN, no affine, last
        assert [type(m).__name__ for m in projector[:3]] == ["Linear", "BatchNorm1d", "ReLU"]
        return len(layers)

    small = ["--dataset", "synthetic", "--synthetic-per-class", "4", "--imbalance-ratio", "1"]
    assert linear_layers(*small, "--image-size", "32") == 2
    assert linear_layers(*small, "--image-size", "96") == 3
    assert linear_layers(*small, "--image-size", "32", "--proj-layers", "4") == 4
    args = tyro.cli(ss.Args, args=[*small, "--image-size", "32", "--proj-layers", "1"])
    with pytest.raises(lt_data.DataError, match="--proj-layers must be >= 2, got 1"):
        ss.validate(args)
