"""msn_prior.py: the equations against independent computations, the mechanism, DDP exactness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import msn_prior as M
from conftest import TINY_ARGS, run_script
from linear_probe import build_backbone

# --------------------------------------------------------------------------- independent reference (numpy, float64)


def np_softmax(x, axis=1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def np_normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_sinkhorn(q, iters, marginals=None):
    """Sinkhorn-Knopp written out: prototype (column) marginals 1/K or marginals[k], sample (row) marginals 1/B,
    rows sum to 1."""
    B, K = q.shape
    Q = q / q.sum()
    for _ in range(iters):
        for k in range(K):
            Q[:, k] = Q[:, k] / Q[:, k].sum() * (1 / K if marginals is None else marginals[k])
        for b in range(B):
            Q[b, :] = Q[b, :] / Q[b, :].sum() / B
    return Q * B


def reference_loss(
    anchor, target, protos, prior, t_a=0.1, sharpen_T=0.25, sinkhorn_iters=3, lam=1.0, sinkhorn_marginals=None
):
    """MSN/PMSN from the papers' description: targets are softmax(./0.1) sharpened with T = 0.25."""
    a, t, P = (
        np_normalise(anchor.astype(np.float64)),
        np_normalise(target.astype(np.float64)),
        np_normalise(protos.astype(np.float64)),
    )
    B = t.shape[0]
    V = a.shape[0] // B
    p = np_softmax(a @ P.T / t_a)
    q = np_softmax(t @ P.T / 0.1) ** (1 / sharpen_T)
    q = q / q.sum(1, keepdims=True)
    if sinkhorn_iters:
        q = np_sinkhorn(q, sinkhorn_iters, sinkhorn_marginals)
    ce = 0.0
    for v in range(V):
        for b in range(B):
            ce += -(q[b] * np.log(p[v * B + b])).sum()
    ce /= V * B
    pbar = p.mean(0)
    reg = sum(pbar[k] * math.log(pbar[k] / prior[k]) for k in range(len(prior)))
    return ce + lam * reg, ce, reg


def small_case(seed=0, B=4, V=3, D=5, K=6):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V * B, D, generator=g), torch.randn(B, D, generator=g), torch.randn(K, D, generator=g))


# --------------------------------------------------------------------------- the prior


def test_power_law_prior_hand_values():
    torch.testing.assert_close(
        M.power_law_prior(3, 0.25), torch.tensor([0.384507, 0.323331, 0.292162]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(M.power_law_prior(2, 1.0), torch.tensor([2 / 3, 1 / 3]))
    torch.testing.assert_close(M.power_law_prior(7, 0.0), torch.full((7,), 1 / 7))
    pi = M.power_law_prior(1024, 0.25)
    assert abs(pi.sum().item() - 1) < 1e-6 and abs((pi[0] / pi[-1]).item() - 1024**0.25) < 1e-3


# --------------------------------------------------------------------------- the loss against the equations


@pytest.mark.parametrize("prior_kind", ["uniform", "power-law"])
@pytest.mark.parametrize("iters", [0, 3])
def test_msn_loss_matches_the_equations(prior_kind, iters):
    anchor, target, protos = small_case()
    K = protos.shape[0]
    prior = M.power_law_prior(K, 0.0 if prior_kind == "uniform" else 0.5)
    total, ce, reg = M.msn_loss(anchor, target, protos, prior, sinkhorn_iters=iters, reg_weight=0.7)
    r_total, r_ce, r_reg = reference_loss(
        anchor.numpy(), target.numpy(), protos.numpy(), prior.double().numpy(), sinkhorn_iters=iters, lam=0.7
    )
    assert abs(ce.item() - r_ce) < 1e-5 and abs(reg.item() - r_reg) < 1e-5 and abs(total.item() - r_total) < 1e-5


def test_msn_loss_with_sinkhorn_to_the_prior_matches_the_equations():
    anchor, target, protos = small_case(seed=4)
    prior = M.power_law_prior(protos.shape[0], 0.5)
    total, ce, reg = M.msn_loss(anchor, target, protos, prior, reg_weight=0.7, sinkhorn_marginals=prior)
    r_total, r_ce, r_reg = reference_loss(
        anchor.numpy(),
        target.numpy(),
        protos.numpy(),
        prior.double().numpy(),
        lam=0.7,
        sinkhorn_marginals=prior.double().numpy(),
    )
    assert abs(ce.item() - r_ce) < 1e-5 and abs(reg.item() - r_reg) < 1e-5 and abs(total.item() - r_total) < 1e-5
    uniform_ce = M.msn_loss(anchor, target, protos, prior, reg_weight=0.7)[1]  # the marginals change the targets
    assert abs(uniform_ce.item() - ce.item()) > 1e-3


def _embeddings_with_prediction(pbar, temp=0.1, D=4):
    """One anchor row (repeated) whose prediction is exactly pbar: a = e1, prototype k = s_k e1 + sqrt(1-s_k^2) u_k."""
    s = temp * torch.log(torch.tensor(pbar, dtype=torch.float64))
    u = torch.eye(D, dtype=torch.float64)[1 : len(pbar) + 1]
    P = s[:, None] * torch.eye(D, dtype=torch.float64)[0] + torch.sqrt(1 - s**2)[:, None] * u
    a = torch.eye(D, dtype=torch.float64)[:1].repeat(2, 1)
    return a, P


def test_regulariser_hand_case_from_the_spec():
    a, P = _embeddings_with_prediction([0.1, 0.3, 0.6])
    target = a[:1]
    _, _, r_pl = M.msn_loss(a, target, P, M.power_law_prior(3, 0.25), sinkhorn_iters=0)
    _, _, r_u = M.msn_loss(a, target, P, M.power_law_prior(3, 0.0), sinkhorn_iters=0)
    assert abs(r_pl.item() - 0.274625) < 1e-5  # KL(pbar || pi), tau = 0.25
    assert abs(r_u.item() - 0.200667) < 1e-5  # sum pbar log pbar + log K (MSN)
    a2, P2 = _embeddings_with_prediction([0.5, 0.5])
    _, _, r2 = M.msn_loss(a2, a2[:1], P2, M.power_law_prior(2, 1.0), sinkhorn_iters=0)
    assert abs(r2.item() - 0.058892) < 1e-5


def test_uniform_prior_kl_and_negative_entropy_give_identical_gradients():
    anchor, target, protos = small_case(1)
    K = protos.shape[0]
    grads = []
    for use_kl in (True, False):
        a, P = anchor.clone().requires_grad_(), protos.clone().requires_grad_()
        if use_kl:
            reg = M.msn_loss(a, target, P, M.power_law_prior(K, 0.0), sinkhorn_iters=0)[2]
        else:  # MSN's me-max written independently: -H(mean_i softmax(a_i . P / 0.1))
            pbar = F.softmax(F.normalize(a, dim=1) @ F.normalize(P, dim=1).T / 0.1, dim=1).mean(0)
            reg = (pbar * pbar.log()).sum()
        reg.backward()
        grads.append((a.grad, P.grad, reg.detach()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-5)
    assert abs(grads[0][2].item() - (grads[1][2].item() + math.log(K))) < 1e-5  # they differ by log K


def test_regulariser_gradient_and_permutation_properties():
    a, P = _embeddings_with_prediction([0.1, 0.3, 0.6])
    pi = M.power_law_prior(3, 0.25)
    # dR/dpbar_k = log(pbar_k / pi_k) + 1 (spec oracle): check through the chain rule on the logits
    theta = torch.log(torch.tensor([0.1, 0.3, 0.6])).requires_grad_()
    pbar = F.softmax(theta, 0)
    R = (pbar * (pbar.log() - pi.log())).sum()
    R.backward()
    dR_dp = torch.log(torch.tensor([0.1, 0.3, 0.6]) / pi) + 1
    torch.testing.assert_close(dR_dp, torch.tensor([-0.3468, 0.9251, 1.7196]), atol=1e-4, rtol=0)
    p = pbar.detach()
    torch.testing.assert_close(theta.grad, p * (dR_dp - (p * dR_dp).sum()))
    # permuting prototypes together with pi leaves R unchanged, alone it changes R (tau > 0)
    perm = torch.tensor([2, 0, 1])
    _, _, r0 = M.msn_loss(a, a[:1], P, pi, sinkhorn_iters=0)
    _, _, r1 = M.msn_loss(a, a[:1], P[perm], pi[perm], sinkhorn_iters=0)
    _, _, r2 = M.msn_loss(a, a[:1], P[perm], pi, sinkhorn_iters=0)
    assert abs(r0.item() - r1.item()) < 1e-6 and abs(r0.item() - r2.item()) > 1e-2
    assert r0.item() >= 0


def test_prototypes_get_gradient_target_gets_none():
    anchor, target, protos = small_case(2)
    anchor.requires_grad_()
    target.requires_grad_()
    protos.requires_grad_()
    total, _, _ = M.msn_loss(anchor, target, protos, M.power_law_prior(6, 0.25))
    total.backward()
    assert target.grad is None
    assert protos.grad.abs().sum() > 0 and anchor.grad.abs().sum() > 0


def test_sinkhorn_marginals_and_sharpening():
    g = torch.Generator().manual_seed(3)
    q = F.softmax(torch.randn(8, 4, generator=g) * 3, dim=1)
    out = M.sinkhorn_knopp(q, 3)
    torch.testing.assert_close(out.sum(1), torch.ones(8))
    np.testing.assert_allclose(out.numpy(), np_sinkhorn(q.double().numpy(), 3), atol=1e-6)
    many = M.sinkhorn_knopp(q, 200)
    torch.testing.assert_close(many.sum(0), torch.full((4,), 8 / 4), atol=1e-4, rtol=0)
    prior = M.power_law_prior(4, 1.0)  # --sinkhorn prior: the prototype sums go to B * pi_k, not B / K
    to_prior = M.sinkhorn_knopp(q, 3, prior)
    torch.testing.assert_close(to_prior.sum(1), torch.ones(8))
    np.testing.assert_allclose(to_prior.numpy(), np_sinkhorn(q.double().numpy(), 3, prior.double().numpy()), atol=1e-6)
    torch.testing.assert_close(M.sinkhorn_knopp(q, 200, prior).sum(0), 8 * prior, atol=1e-4, rtol=0)
    s = torch.randn(5, 7, generator=g)
    sharp = F.softmax(s / 0.1, 1) ** 4
    torch.testing.assert_close(sharp / sharp.sum(1, keepdim=True), F.softmax(s / 0.025, 1))


# --------------------------------------------------------------------------- the encoder, masking, schedules


def test_masking_keeps_the_right_tokens():
    kw = dict(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    vit = build_backbone("vit", **kw).eval()
    x = torch.randn(3, 3, 16, 16)
    seen = []
    vit.encoder.layers.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    keep = M.mask_keep_indices(torch.arange(3), 16, int(16 * (1 - 0.3)), step=5, seed=1)
    with torch.no_grad():
        vit(x, keep)
    assert seen == [math.floor(16 * 0.7) + 1]
    # dropping a token changes the output; the kept tokens alone define it (no mask tokens)
    full = torch.arange(16)[None].repeat(3, 1)
    with torch.no_grad():
        torch.testing.assert_close(vit(x, full), vit(x))
        assert not torch.allclose(vit(x, keep), vit(x))


def test_masks_depend_on_the_image_not_on_the_batch():
    a = M.mask_keep_indices(torch.tensor([3, 7, 11, 20]), 64, 54, step=9, seed=1)
    b = M.mask_keep_indices(torch.tensor([11, 3]), 64, 54, step=9, seed=1)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert all(len(set(r.tolist())) == 54 for r in a)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, M.mask_keep_indices(torch.tensor([3, 7, 11, 20]), 64, 54, step=10, seed=1))
    shared = M.mask_keep_indices(torch.tensor([3, 7]), 64, 54, step=9, seed=1, shared=True)
    assert torch.equal(shared[0], shared[1])


def test_schedules_follow_msn_with_the_horizon():
    args = M.Args(epochs=10, lr=1.0, warmup_epochs=2)
    spe, total = 10, 100
    assert abs(M.schedules(args, 0, total, spe)["lr_scale"] - 0.2) < 1e-9
    assert abs(M.schedules(args, 20, total, spe)["lr_scale"] - 1.0) < 1e-9
    last = M.schedules(args, total - 1, total, spe)["lr_scale"]
    assert args.final_lr_ratio < last < 0.2  # 1.25 horizon: never reaches the final value
    wd0, m0 = (M.schedules(args, 0, total, spe)[k] for k in ("weight_decay", "ema_momentum"))
    wd1, m1 = (M.schedules(args, total, total, spe)[k] for k in ("weight_decay", "ema_momentum"))
    assert wd0 == pytest.approx(0.04) and m0 == pytest.approx(0.996)
    assert m1 == pytest.approx(0.996 + 0.004 / 1.25)  # ends near 0.9992
    assert wd1 == pytest.approx(0.4 - 0.36 * 0.5 * (1 + math.cos(math.pi * 0.8)))  # cosine at t = 1/1.25


# --------------------------------------------------------------------------- behaviour


def _train_prototypes(prior, iters, steps=100, seed=0):
    """Fixed synthetic features (8 unequal clusters), learnable prototypes, Adam on msn_loss."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    sizes = [40, 20, 12, 8, 6, 4, 3, 3]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    feats = centres[labels] + 0.3 * torch.randn(len(labels), 16, generator=g)
    protos = torch.nn.Parameter(torch.randn(len(prior), 16, generator=g) * 0.1)
    opt = torch.optim.Adam([protos], lr=0.02)

    def usage():
        with torch.no_grad():
            return F.softmax(F.normalize(feats, dim=1) @ F.normalize(protos, dim=1).T / 0.1, 1).mean(0)

    before = usage()
    for _ in range(steps):
        anchors = torch.cat([feats + 0.05 * torch.randn(feats.shape, generator=g) for _ in range(2)])
        total, _, _ = M.msn_loss(anchors, feats, protos, prior, sinkhorn_iters=iters)
        opt.zero_grad()
        total.backward()
        opt.step()
    return before, usage()


def _kl(p, q):
    return (p * (p / q).log()).sum().item()


@pytest.fixture(scope="module")
def trained_usage():
    """Prototype usage before/after training with each prior (the power law without Sinkhorn, the uniform with)."""
    return {
        "power-law": _train_prototypes(M.power_law_prior(16, 1.0), iters=0),
        "uniform": _train_prototypes(M.power_law_prior(16, 0.0), iters=3),
    }


def test_power_law_prior_moves_sorted_usage_toward_the_prior(trained_usage):
    pi = M.power_law_prior(16, 1.0)
    before, after = trained_usage["power-law"]
    sb, sa = before.sort(descending=True).values, after.sort(descending=True).values
    assert _kl(sa, pi) < 0.5 * _kl(sb, pi)
    assert _kl(sa, pi) < _kl(sa, torch.full((16,), 1 / 16))  # closer to the power law than to uniform
    other = trained_usage["uniform"][1].sort(descending=True).values
    assert _kl(sa, pi) < 0.5 * _kl(other, pi)  # the uniform prior does not do this


def test_uniform_prior_moves_usage_toward_uniform(trained_usage):
    uniform = M.power_law_prior(16, 0.0)
    before, after = trained_usage["uniform"]
    assert _kl(after, uniform) < 0.5 * _kl(before, uniform)
    assert _kl(after, uniform) < 0.5 * _kl(trained_usage["power-law"][1], uniform)  # the power law does not


# --------------------------------------------------------------------------- DDP exactness (2 gloo processes)


def _ddp_case(iters, tau):
    g = torch.Generator().manual_seed(7)
    B, V, D, K = 6, 3, 5, 8
    x = torch.randn(V, 2 * B, D, generator=g)  # per view, the global batch of 2B
    t = torch.randn(2 * B, D, generator=g)
    W = torch.randn(D, D, generator=g)
    P = torch.randn(K, D, generator=g)
    return x, t, W, P, M.power_law_prior(K, tau), B


def _ddp_loss(x, t, W, P, prior, iters):
    """anchor_emb = x W (a 'network' with a parameter), view-major rows; iters "prior": 3 Sinkhorn iterations
    toward the prior's marginals (--sinkhorn prior)."""
    anchor = (x @ W).reshape(-1, x.shape[-1])
    marginals = prior if iters == "prior" else None
    return M.msn_loss(
        anchor, t @ W.detach(), P, prior, sinkhorn_iters=3 if iters == "prior" else iters, sinkhorn_marginals=marginals
    )


def _ddp_worker(rank, path, iters, tau, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    x, t, W, P, prior, B = _ddp_case(iters, tau)
    W, P = W.requires_grad_(), P.requires_grad_()
    part = slice(rank * B, (rank + 1) * B)
    total, ce, reg = _ddp_loss(x[:, part], t[part], W, P, prior, iters)
    total.backward()
    for grad in (W.grad, P.grad):  # what DDP does: average the gradients
        dist.all_reduce(grad)
        grad /= 2
    total_mean = total.detach().clone()
    dist.all_reduce(total_mean)
    torch.save({"total": total_mean / 2, "reg": reg.detach(), "W": W.grad, "P": P.grad}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("iters,tau", [(3, 0.0), (0, 0.5), ("prior", 0.5)])
def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path, iters, tau):
    x, t, W, P, prior, B = _ddp_case(iters, tau)
    W, P = W.requires_grad_(), P.requires_grad_()
    total, _, reg = _ddp_loss(x, t, W, P, prior, iters)
    total.backward()
    out = str(tmp_path / "res")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), iters, tau, out), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(f"{out}.{rank}", weights_only=True)
        torch.testing.assert_close(r["reg"], reg.detach(), atol=1e-6, rtol=1e-5)  # global pbar on each rank
        torch.testing.assert_close(r["total"], total.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["W"], W.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["P"], P.grad, atol=1e-5, rtol=1e-5)


def test_per_process_mean_would_differ(tmp_path):
    """The check above can fail: lightly's per-process pbar gives another regulariser."""
    x, t, W, P, prior, B = _ddp_case(0, 0.5)
    _, _, reg = _ddp_loss(x, t, W, P, prior, 0)
    halves = [_ddp_loss(x[:, s], t[s], W, P, prior, 0)[2] for s in (slice(0, B), slice(B, 2 * B))]
    assert abs((halves[0] + halves[1]).item() / 2 - reg.item()) > 1e-4


# --------------------------------------------------------------------------- the script


def test_power_law_smoke_run_logs_the_method_metrics(tmp_path):
    run_script(
        "msn_prior.py",
        *TINY_ARGS["msn_prior.py"],
        "--prior",
        "power-law",
        "--batch-size",
        "8",
        "--max-steps",
        "3",
        "--log-every",
        "1",
        "--num-workers",
        "0",
        "--run-name",
        "pl",
        cwd=tmp_path,
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "runs" / "pl"))
    acc.Reload()
    scalars, hists = set(acc.Tags()["scalars"]), set(acc.Tags()["histograms"])
    for tag in (
        "losses/cross_entropy",
        "losses/regulariser",
        "charts/kl_mean_to_prior",
        "charts/kl_sorted_to_prior",
        "charts/prototype_entropy",
        "charts/prototypes_in_use",
        "charts/ema_momentum",
        "charts/images_per_second",
    ):
        assert tag in scalars, tag
    assert {"charts/sorted_usage", "charts/sorted_usage_over_prior"} <= hists
    ckpt = torch.load(tmp_path / "runs" / "pl" / "checkpoint.pt", weights_only=True)
    torch.testing.assert_close(ckpt["model"]["prior"], M.power_law_prior(16, 0.25))
    assert ckpt["args"]["sinkhorn"] is None and ckpt["backbone"]["prefix"] == "target_encoder."


@pytest.mark.parametrize(
    "prior,sinkhorn,iters,to_prior",
    [
        ("uniform", None, 3, False),
        ("power-law", None, 3, True),
        ("power-law", "off", 0, False),
        ("power-law", "uniform", 3, False),
        ("uniform", "prior", 3, True),
    ],
)
def test_sinkhorn_default_follows_the_prior(prior, sinkhorn, iters, to_prior):
    from types import SimpleNamespace

    args = M.Args(
        arch="vit_tiny",
        vit_layers=1,
        vit_dim=12,
        vit_heads=2,
        head_hidden=8,
        head_out=4,
        num_prototypes=5,
        prior=prior,
        sinkhorn=sinkhorn,
    )
    model = M.Model(args, SimpleNamespace(image_size=16))  # the model reads only the image size of the data
    assert (model.sinkhorn_iters, model.sinkhorn_to_prior) == (iters, to_prior)


def test_impossible_view_sizes_fail_with_one_line(tmp_path):
    proc = run_script(
        "msn_prior.py",
        *TINY_ARGS["msn_prior.py"],
        "--focal-size",
        "6",
        "--max-steps",
        "1",
        "--num-workers",
        "0",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "--focal-size 6 is not a multiple of --patch-size 4" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra", [["--target-temp", "0.002"], ["--target-temp", "0.005"]])
def test_sharp_targets_train_instead_of_blaming_the_lr(tmp_path, extra):
    """A prototype whose target mass underflowed to 0 made Sinkhorn divide 0 by 0, and the run stopped with
    'non-finite loss ... Try a lower --lr or --amp none', flags that already held."""
    args = [*TINY_ARGS["msn_prior.py"], "--batch-size", "8", "--max-steps", "2", "--num-workers", "0", *extra]
    assert "done: step 2" in run_script("msn_prior.py", *args, "--eval-every", "0", cwd=tmp_path).stdout


def test_sinkhorn_keeps_a_prototype_without_mass_at_zero():
    q = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])  # prototype 2 has no mass at all
    out = M.sinkhorn_knopp(q, iters=3)
    assert torch.isfinite(out).all() and torch.allclose(out.sum(dim=1), torch.ones(2)) and (out[:, 2] == 0).all()


def test_a_prior_that_underflows_float32_is_refused_with_its_safe_range(tmp_path):
    """--prior-tau 15 with K 1024: the last prototype's prior mass is below float32's range, log(prior) is -inf."""
    args = [*TINY_ARGS["msn_prior.py"], "--batch-size", "8", "--max-steps", "1", "--num-workers", "0"]
    args += ["--prior", "power-law", "--prior-tau", "15", "--num-prototypes", "1024"]
    proc = run_script("msn_prior.py", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--prior-tau 15 gives the last of --num-prototypes 1024 a prior mass below float32's range" in proc.stderr
    assert "use --prior-tau below 14.9" in proc.stderr and M.power_law_prior(1024, 14.8).min() > 0
