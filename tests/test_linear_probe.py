"""linear_probe: metrics on features whose answer is known by construction, loading, the CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torchvision

import linear_probe as lp
from conftest import HANG_GUARD, ROOT, TINY_DATA, run_script, script_env


def _clusters(n_per_class, classes=4, dim=16, spread=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:classes] * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_knn_recovers_separated_clusters_and_weights_votes():
    f, y = _clusters(30)
    ft, yt = _clusters(10, seed=1)
    assert torch.equal(lp.knn_predict(f, y, ft, 4, k=200), yt)
    # hand case: one neighbour of class 0 at cos 1, two of class 1 at cos 0.5; T=0.1 -> e^10 > 2 e^5
    train = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)]])
    pred = lp.knn_predict(train, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]]), 2, k=3, temperature=0.1)
    assert pred.item() == 0
    pred = lp.knn_predict(train, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]]), 2, k=3, temperature=10.0)
    assert pred.item() == 1  # at a high temperature the two votes outweigh the one


def _reference_knn(train_f, train_y, test_f, num_classes, k, temperature):
    """The probe's kNN as it was before it ran on the features' device (CPU, 1,024-query chunks, one scatter_add_
    per chunk), written out whole: every similarity at once."""
    train_f, test_f = torch.nn.functional.normalize(train_f, dim=1), torch.nn.functional.normalize(test_f, dim=1)
    sim, idx = (test_f @ train_f.T).topk(min(k, len(train_f)), dim=1)
    votes = torch.zeros(len(test_f), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
    return votes.argmax(1)


def _reference_linear(train_f, train_y, num_classes, epochs, lr, batch_size, weight_decay, seed):
    """The linear head as it was trained before (CPU generator, LambdaLR cosine): its weight and bias."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    clf = torch.nn.Linear(train_f.shape[1], num_classes)
    torch.nn.init.zeros_(clf.weight), torch.nn.init.zeros_(clf.bias)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    xs = (train_f - mean) / std
    steps = epochs * math.ceil(len(xs) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(epochs):
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(xs), batch_size):
            j = perm[i : i + batch_size]
            loss = torch.nn.functional.cross_entropy(clf(xs[j]), train_y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return clf.weight.detach(), clf.bias.detach()


def test_probes_on_cpu_give_what_they_gave_before_they_followed_the_device():
    """Same seeds, same numbers, bit for bit: kNN predictions (any chunking) and the linear head's weights."""
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(1500, 24, generator=g), torch.randn(300, 24, generator=g)
    train_y = torch.randint(0, 30, (1500,), generator=g)
    for n, k, t in ((1500, 200, 0.1), (1500, 20, 0.07), (1500, 1, 1.0), (150, 5000, 0.5)):  # the last: k > n
        expected = _reference_knn(train_f[:n], train_y[:n], test_f, 30, k, t)
        assert 0 < (expected == expected[0]).sum() < len(expected)  # not one class for every query
        for chunk in (None, 37, 1024):
            assert torch.equal(lp.knn_predict(train_f[:n], train_y[:n], test_f, 30, k, t, chunk), expected), (k, chunk)
    weight, bias = _reference_linear(train_f, train_y, 30, 3, 0.5, 64, 1e-4, seed=3)
    head = lp.train_linear(train_f, train_y, 30, epochs=3, lr=0.5, batch_size=64, weight_decay=1e-4, seed=3)
    assert torch.equal(head[1].weight, weight) and torch.equal(head[1].bias, bias)
    assert weight.abs().sum() > 0


DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_head_and_knn_run_on_the_features_device(device):
    """The head's parameters and buffers, its logits and the kNN predictions are on the features' device (the meta
    device stands in for an accelerator here: a step that fell back to the CPU would fail or land elsewhere)."""
    g = torch.Generator().manual_seed(0)
    train_f, train_y = torch.randn(200, 8, generator=g).to(device), torch.randint(0, 5, (200,), generator=g).to(device)
    head = lp.train_linear(train_f, train_y, 5, epochs=2, lr=0.1, batch_size=32, weight_decay=0.0, seed=0)
    assert {t.device.type for t in [*head.parameters(), *head.buffers()]} == {device}
    with torch.no_grad():
        assert head(train_f[:7]).device.type == device and head(train_f[:7]).shape == (7, 5)
    pred = lp.knn_predict(train_f, train_y, train_f[:9], 5, k=20, temperature=0.07)
    assert pred.device.type == device and pred.shape == (9,) and pred.dtype == torch.long


def _similarity_blocks(*args, **kwargs) -> list[tuple]:
    """The shapes of the query x bank similarity blocks knn_predict computes (its matmuls), and its predictions."""
    from torch.overrides import TorchFunctionMode

    blocks = []

    class RecordMatmul(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "__name__", "") in ("matmul", "__matmul__"):
                blocks.append(tuple(out.shape))
            return out

    with RecordMatmul():
        pred = lp.knn_predict(*args, **kwargs)
    return blocks, pred


def test_knn_similarity_blocks_stay_within_256_mb_and_give_the_whole_banks_nearest():
    """Each block of query x bank similarities is within KNN_BLOCK_BYTES (256 MB, float32): at least 1,024 queries
    a block (each block reads the whole bank), more on a small bank, against bank tiles that fit; the tiles' k
    nearest are merged into the bank's. Sizes on the meta device (shapes, no arithmetic); a cut budget on CPU data
    gives the reference's predictions."""
    assert lp.KNN_BLOCK_BYTES == 256 * 2**20 and lp.KNN_MIN_QUERIES == 1024

    def meta(n_bank, n_queries):
        f = torch.empty(n_bank, 4, device="meta")
        return _similarity_blocks(f, torch.empty(n_bank, dtype=torch.long, device="meta"), f[:n_queries], 10)[0]

    assert meta(115_846, 2048) == [(1024, 65_536), (1024, 50_310)] * 2  # ImageNet-LT
    assert meta(437_513, 1024) == [(1024, 65_536)] * 6 + [(1024, 44_297)]  # iNaturalist 2018
    assert meta(5000, 2000) == [(2000, 5000)]  # a monitor's bank: every query at once (13,421 would fit)
    f, y = _clusters(25)  # 100 images, 4 classes
    ft, yt = _clusters(10, seed=1)  # 40 queries
    budget = lp.KNN_BLOCK_BYTES
    try:
        lp.KNN_BLOCK_BYTES = 4 * 40 * 17 + 3  # tiles of 17 bank images
        blocks, pred = _similarity_blocks(f, y, ft, 4, k=5, temperature=0.07)
        assert blocks == [(40, 17)] * 5 + [(40, 15)]
        assert torch.equal(pred, _reference_knn(f, y, ft, 4, 5, 0.07)) and torch.equal(pred, yt)
        g = torch.Generator().manual_seed(0)
        train_f, test_f = torch.randn(300, 8, generator=g), torch.randn(50, 8, generator=g)
        train_y = torch.randint(0, 6, (300,), generator=g)
        for k in (1, 5, 17, 40, 300):  # below, at and above a tile
            got = lp.knn_predict(train_f, train_y, test_f, 6, k, 0.07, chunk=7)
            assert torch.equal(got, _reference_knn(train_f, train_y, test_f, 6, k, 0.07)), k
    finally:
        lp.KNN_BLOCK_BYTES = budget


def test_probe_main_uses_every_usable_core_unless_omp_num_threads_is_set(monkeypatch, tmp_path):
    """On a CPU the probe's main asks for lt_data.usable_cpus() threads (os.sched_getaffinity); a thread count set
    on purpose in OMP_NUM_THREADS (a share of the cores for parallel jobs) is left alone. Importing sets nothing."""
    import lt_data

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(lt_data, "usable_cpus", lambda: 5)

    def stop(args):
        raise lp.ProbeError("stopped after the set-up")

    monkeypatch.setattr(lp, "run_probe", stop)
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main wraps it (QuietWhenClosed): restored afterwards
    ckpt = tmp_path / "backbone.pt"
    ckpt.write_bytes(b"")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with pytest.raises(SystemExit):
        lp.main([str(ckpt)])
    assert calls == [5]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(SystemExit):
        lp.main([str(ckpt)])
    assert calls == [5]
    code = "import torch; n = torch.get_num_threads(); import linear_probe; print(n == torch.get_num_threads())"
    env = script_env(threads=1)
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "True\n"


def test_linear_probe_separates_linearly_separable_features():
    f, y = _clusters(50, spread=0.5)
    ft, yt = _clusters(20, spread=0.5, seed=2)
    clf = lp.train_linear(f, y, 4, epochs=20, lr=0.5, batch_size=32, weight_decay=0.0, seed=0)
    assert (clf(ft).argmax(1) == yt).float().mean() == 1.0


def test_accuracy_report_groups_by_hand():
    target = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    pred = target.clone()
    pred[[3, 6, 7, 10, 11]] = 9  # class 1 half right, class 3 and 5 all wrong
    groups = {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    r = lp.accuracy_report(pred, target, 6, groups)
    assert r["per_class"] == [100.0, 50.0, 100.0, 0.0, 100.0, 0.0]
    assert r["top1"] == pytest.approx(700 / 12)
    assert (r["many"], r["medium"], r["few"]) == (75.0, 50.0, 50.0)
    assert r["group_std"] == pytest.approx(math.sqrt(((75 - 175 / 3) ** 2 + 2 * (50 - 175 / 3) ** 2) / 3))


def test_few_shot_indices():
    y = torch.tensor([0] * 10 + [1] * 3)
    idx = lp.few_shot_indices(y, 5, seed=0)
    assert (y[idx] == 0).sum() == 5 and (y[idx] == 1).sum() == 3
    assert not torch.equal(idx, lp.few_shot_indices(y, 5, seed=1))


def test_exported_backbone_loads_into_plain_torchvision(tiny_supervised_run):
    export = torch.load(tiny_supervised_run / "backbone.pt", weights_only=True)
    model = torchvision.models.resnet18()
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR stem, as in the README
    model.maxpool = torch.nn.Identity()
    model.fc = torch.nn.Identity()
    model.load_state_dict(export["state_dict"], strict=True)
    loaded, meta = lp.load_backbone(str(tiny_supervised_run / "checkpoint.pt"))
    x = torch.randn(2, 3, 16, 16)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x)) and meta["method"] == "supervised"


def test_probe_cli_end_to_end(tiny_supervised_run, tmp_path):
    out = tmp_path / "probe.json"
    proc = run_script(
        "linear_probe.py",
        str(tiny_supervised_run / "backbone.pt"),
        "--epochs",
        "3",
        "--shots",
        "2",
        "--few-shot-seeds",
        "2",
        "--num-workers",
        "0",
        "--output",
        str(out),
        "--tensorboard",
        cwd=tmp_path,
    )
    assert "| linear |" in proc.stdout and "| knn (k 20, T 0.07) |" in proc.stdout and "2-shot" in proc.stdout
    assert "extracting features of the training images: 128/128" in proc.stdout  # says what it is doing
    assert "training the linear head: epoch 3/3" in proc.stdout
    res = json.loads(out.read_text())
    assert res["dataset"] == "synthetic" and res["num_test"] == 32 and res["num_train"] == 128  # every image
    assert res["groups"] == {"many": [0, 1], "medium": [2], "few": [3]}  # thirds of 4 long-tailed classes
    assert len(res["linear"]["per_class"]) == 4 and len(res["few_shot"]["2"]["runs"]) == 2
    assert (res["knn"]["k"], res["knn"]["temperature"]) == (20, 0.07)  # DINO's, whatever the class sizes
    # the long-tailed training set instead of the balanced one
    run_script(
        "linear_probe.py",
        str(tiny_supervised_run / "checkpoint.pt"),
        "--train-on",
        "long-tailed",
        "--epochs",
        "2",
        "--num-workers",
        "0",
        "--output",
        str(tmp_path / "lt.json"),
        cwd=tmp_path,
    )
    res_lt = json.loads((tmp_path / "lt.json").read_text())
    # int(32 * 4^(-i/3)) for i = 0..3
    assert res_lt["num_train"] == 32 + 20 + 12 + 8 and res_lt["train_on"] == "long-tailed"


@pytest.mark.parametrize("spelling", ["--synthetic_test_per_class", "--synthetic-test-per-class"])
def test_probe_data_flags_passed_in_either_spelling_win_over_the_run(tiny_supervised_run, tmp_path, spelling):
    """tyro takes --a_b as well as --a-b; the probe used to scan argv for the hyphen spelling only and replaced
    an underscore-spelled flag with the run's value (8 test images per class: 32, not 16)."""
    run_script(
        "linear_probe.py",
        str(tiny_supervised_run / "backbone.pt"),
        spelling,
        "4",
        "--epochs",
        "1",
        "--num-workers",
        "0",
        "--output",
        str(tmp_path / "p.json"),
        cwd=tmp_path,
    )
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["num_test"] == 16 and res["num_train"] == 128  # 4 classes x 4; the rest is the run's


def test_probe_out_of_domain(tiny_supervised_run, tmp_path):
    run_script(
        "linear_probe.py",
        str(tiny_supervised_run / "backbone.pt"),
        "--dataset",
        "synthetic",
        "--synthetic-classes",
        "3",
        "--synthetic-per-class",
        "5",
        "--synthetic-test-per-class",
        "2",
        "--split-seed",
        "7",
        "--epochs",
        "2",
        "--num-workers",
        "0",
        "--output",
        str(tmp_path / "ood.json"),
        cwd=tmp_path,
    )
    res = json.loads((tmp_path / "ood.json").read_text())
    assert res["num_train"] == 15 and res["num_test"] == 6 and len(res["linear"]["per_class"]) == 3


@pytest.mark.parametrize("case", ["missing", "corrupted", "not_a_backbone", "pickled_object"])
def test_probe_refuses_bad_checkpoints_in_one_line(tmp_path, case):
    path = tmp_path / "x.pt"
    if case == "corrupted":
        path.write_bytes(b"\x00garbage" * 10)
    elif case == "not_a_backbone":
        torch.save({"weights": torch.zeros(3)}, path)
    elif case == "pickled_object":
        torch.save({"format": lp.EXPORT_FORMAT, "backbone": {}, "state_dict": {}, "evil": _Pickled()}, path)
    proc = run_script("linear_probe.py", str(path), "--dataset", "synthetic", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    expected = {
        "missing": "not found",
        "corrupted": "cannot load",
        "not_a_backbone": "not a backbone",
        "pickled_object": "weights_only",
    }[case]
    assert expected in proc.stderr


class _Pickled:
    """An arbitrary Python object: weights_only=True must refuse to unpickle it."""


def test_vit_is_torchvision_compatible_takes_small_crops_and_drops_paths():
    kw = lp.vit_kwargs("vit_tiny", 16, layers=3, heads=2, dim=32)
    assert kw == dict(image_size=16, patch_size=4, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=128)
    vit = lp.build_backbone("vit", **kw).eval()
    tv = torchvision.models.VisionTransformer(**kw)
    tv.heads = torch.nn.Identity()
    tv.load_state_dict(vit.state_dict(), strict=True)
    tv.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), tv(x), atol=1e-5, rtol=1e-5)
    # a local crop: 2x2 patches, the 4x4 position-embedding grid interpolated (torchvision refuses this size)
    seen = []
    vit.encoder.layers.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad():
        assert vit(torch.randn(3, 3, 8, 8)).shape == (3, 32)
    assert seen == [2 * 2 + 1]
    # stochastic depth: linear over the blocks, per sample, training only
    vit.set_drop_path(0.5)
    assert [b.drop_path for b in vit.encoder.layers] == [0.0, 0.25, 0.5]
    with torch.no_grad():
        torch.testing.assert_close(vit(x), tv(x), atol=1e-5, rtol=1e-5)  # eval: no effect
        vit.train()
        torch.manual_seed(0)
        a = vit(x.repeat(64, 1, 1, 1))
        torch.manual_seed(1)
        b = vit(x.repeat(64, 1, 1, 1))
        vit.set_drop_path(0.0)
        c, d = vit(x), vit(x)
    assert not torch.allclose(a, b)  # different samples' branches dropped
    torch.testing.assert_close(c, d)  # rate 0: deterministic in training mode too


def test_vit_kwargs_refuses_impossible_sizes():
    with pytest.raises(lp.BackboneError, match="--vit-dim 30 is not divisible by --vit-heads 4"):
        lp.vit_kwargs("vit_tiny", 32, heads=4, dim=30)
    with pytest.raises(lp.BackboneError, match="--local-size 18 is not a multiple of --patch-size 4"):
        lp.vit_kwargs("vit_small", 32, crop_sizes={"--local-size": 18})
    assert lp.vit_kwargs("vit_small", 224)["patch_size"] == 16


def test_knn_monitor_matches_a_hand_computation_on_a_balanced_bank():
    """The monitor's top-1 against numpy: balanced bank and queries, eval transform, cosine top-20 votes
    weighted by exp(sim / 0.07); the backbone's train mode is restored."""
    import numpy as np

    import lt_data

    rng = np.random.default_rng(0)
    C, size = 3, 8
    centres = rng.integers(40, 216, size=(C, 1, 1, 3))

    def images(n_per_class):
        y = np.repeat(np.arange(C), n_per_class)
        x = np.clip(centres[y] + rng.normal(0, 60, size=(len(y), size, size, 3)), 0, 255).astype(np.uint8)
        return lt_data.ArrayImages(x, y.tolist())

    train, test = images(40), images(12)
    data = lt_data.LTData("t", train, test, list(range(len(train))), [], C, size, (0.5,) * 3, (0.25,) * 3, "thirds")
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(3 * size * size, 16), torch.nn.BatchNorm1d(16)
    ).train()
    monitor = lp.KNNMonitor(data, bank=60, queries=24, batch_size=7, num_workers=0, seed=3)
    top1 = monitor(backbone)
    assert backbone.training

    def subset(targets, total, seed):  # balanced: total // C of each class, drawn as documented
        g = torch.Generator().manual_seed(seed)
        y = torch.tensor(targets)
        return sorted(
            torch.cat(
                [
                    torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[: total // C]]
                    for c in range(C)
                ]
            ).tolist()
        )

    bank, queries = subset(train.targets, 60, 3), subset(test.targets, 24, 4)
    assert np.bincount(np.array(train.targets)[bank]).tolist() == [20] * 3
    backbone.eval()
    W, b = backbone[1].weight.detach().double().numpy(), backbone[1].bias.detach().double().numpy()
    bn = backbone[2]
    scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().double().numpy()

    def feats(arr):
        x = (arr.astype(np.float64) / 255 - 0.5) / 0.25  # ToTensor + Normalize
        z = x.transpose(0, 3, 1, 2).reshape(len(x), -1) @ W.T + b  # C, H, W order, as Flatten sees it
        z = (z - bn.running_mean.double().numpy()) * scale + bn.bias.detach().double().numpy()
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    fb, fq = feats(train.array[bank]), feats(test.array[queries])
    yb, yq = np.array(train.targets)[bank], np.array(test.targets)[queries]
    correct = 0
    for q, y in zip(fq, yq):
        sim = fb @ q
        top = np.argsort(-sim)[:20]
        votes = np.zeros(C)
        for j in top:
            votes[yb[j]] += np.exp(sim[j] / 0.07)
        correct += votes.argmax() == y
    assert top1 == pytest.approx(100 * correct / len(yq), abs=1e-9)
    assert 0 < correct < len(yq)  # a case where the votes decide: neither all right nor all wrong


def test_probe_help_states_the_defaults_it_uses(tmp_path):
    import re

    out = re.sub(r"[\s│]+", " ", run_script("linear_probe.py", "--help", cwd=tmp_path).stdout)  # unwrapped
    assert "--balanced-twin" not in out  # means nothing to a probe
    assert "(default: cifar10)" not in out and "(default: data)" not in out and "{None," not in out
    assert out.count("(default: the pre-training run's)") >= 10  # the data flags: the run's unless passed


def test_raw_pixels_probe_uses_the_standardised_image_itself(tiny_supervised_run, tmp_path):
    """--raw-pixels: the floor a representation must beat to be better than its input. Its kNN equals a kNN
    computed here on the flattened eval-transformed images; it refuses --random-init in one line."""
    import lt_data

    out = tmp_path / "pixels.json"
    ckpt = str(tiny_supervised_run / "backbone.pt")
    run_script(
        "linear_probe.py",
        ckpt,
        "--raw-pixels",
        "--epochs",
        "2",
        "--num-workers",
        "0",
        "--output",
        str(out),
        cwd=tmp_path,
    )
    res = json.loads(out.read_text())
    assert res["raw_pixels"] and not res["random_init"]
    _, meta = lp.load_backbone(ckpt)
    data = lt_data.build_data(lt_data.DataArgs(**meta["data"]))
    tf = lt_data.eval_transform(data.image_size, data.mean, data.std)
    flat = lambda ds: torch.stack([tf(ds.image(i)).flatten() for i in range(len(ds.targets))])  # noqa: E731
    train_x, test_x = flat(data.train_full), flat(data.test)
    train_y, test_y = torch.tensor(data.train_full.targets), torch.tensor(data.test.targets)
    assert train_x.shape[1] == 3 * 16 * 16
    pred = lp.knn_predict(train_x, train_y, test_x, data.num_classes, res["knn"]["k"], res["knn"]["temperature"])
    assert res["knn"]["top1"] == pytest.approx(100 * (pred == test_y).float().mean().item())
    proc = run_script("linear_probe.py", ckpt, "--raw-pixels", "--random-init", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--random-init and --raw-pixels exclude each other" in proc.stderr


def _grey_folder(root, train: tuple, val: tuple) -> None:
    """An ImageFolder of 16 px grey PNGs with these images per class in train/ and val/."""
    from PIL import Image

    for split, counts in (("train", train), ("val", val)):
        for c, n in enumerate(counts):
            (root / split / str(c)).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (16, 16), 40 * c + i).save(root / split / str(c) / f"{i}.png")


def test_probe_json_is_strict_with_an_empty_shot_group(tiny_supervised_run, tmp_path):
    """An ImageFolder whose classes all have < 20 images has no many- or medium-shot class: those groups were NaN,
    which strict JSON readers refuse; they are null."""
    _grey_folder(tmp_path / "folder", train=(6, 6, 6), val=(2, 2, 2))
    out = tmp_path / "probe.json"
    run_script(
        "linear_probe.py",
        str(tiny_supervised_run / "backbone.pt"),
        *("--dataset", "imagefolder", "--data-dir", str(tmp_path / "folder"), "--epochs", "2", "--num-workers", "0"),
        *("--output", str(out)),
        cwd=tmp_path,
    )

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    res = json.loads(out.read_text(), parse_constant=refuse)
    for probe in ("linear", "knn"):
        assert res[probe]["many"] is None and res[probe]["medium"] is None and res[probe]["few"] is not None


@pytest.mark.parametrize("size", ["2", "18"])
def test_probe_refuses_an_image_size_the_vit_patches_do_not_tile(tmp_path, size):
    """A patch-4 ViT: 2 px failed in the patch convolution with a traceback, 18 px silently dropped a 2 px border."""
    vit = ["--arch", "vit_tiny", "--vit-layers", "1", "--vit-dim", "16", "--vit-heads", "2", "--patch-size", "4"]
    run_script(
        "supervised_baseline.py",
        *TINY_DATA,
        *vit,
        "--batch-size",
        "8",
        "--max-steps",
        "1",
        "--num-workers",
        "0",
        "--eval-every",
        "0",
        cwd=tmp_path,
    )
    backbone = next((tmp_path / "runs").glob("*/backbone.pt"))
    proc = run_script(
        "linear_probe.py", str(backbone), "--image-size", size, "--num-workers", "0", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    expected = {
        "2": "--image-size must be >= 8, got 2",
        "18": "--image-size 18 is not a multiple of the ViT's patch size 4",
    }
    assert proc.stderr.strip() == f"linear_probe.py: error: {expected[size]}"


def test_probe_output_that_cannot_be_written_is_refused_before_any_work(tiny_supervised_run, tmp_path):
    """The whole probe used to run, then die with a traceback on a missing --output folder, losing the results."""
    out = tmp_path / "missing" / "probe.json"
    proc = run_script(
        "linear_probe.py", str(tiny_supervised_run / "backbone.pt"), "--output", str(out), cwd=tmp_path, check=False
    )
    assert proc.returncode == 2 and "extracting" not in proc.stdout, proc.stdout + proc.stderr
    assert (
        proc.stderr.strip()
        == f"linear_probe.py: error: cannot write the results to {out.parent}: No such file or directory"
    )


def test_probe_piped_into_head_ends_quietly_with_its_json_on_disk(tiny_supervised_run, tmp_path):
    """linear_probe.py ... | head -n 1: a BrokenPipeError traceback, then a hang while the DataLoader workers (which
    ignored SIGTERM) lived. Now the reader's closing the pipe silences the output; the probe finishes, writes its
    JSON and exits 0."""
    out = tmp_path / "probe.json"
    cmd = [sys.executable, str(ROOT / "linear_probe.py"), str(tiny_supervised_run / "backbone.pt"), "--epochs", "2"]
    proc = subprocess.Popen(
        [*cmd, "--num-workers", "2", "--output", str(out)],
        cwd=tmp_path,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    proc.stdout.readline()
    proc.stdout.close()  # head -n 1 exits
    try:
        err = proc.stderr.read()
        proc.wait(timeout=HANG_GUARD)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the probe did not end after its reader closed the pipe")
    assert proc.returncode == 0 and err == "", err
    assert json.loads(out.read_text())["linear"]["top1"] >= 0


def test_probe_of_an_imbalanced_folder_does_not_call_its_training_set_balanced(tiny_supervised_run, tmp_path):
    _grey_folder(tmp_path / "folder", train=(6, 4, 2), val=(2, 2, 2))
    out = tmp_path / "probe.json"
    proc = run_script(
        "linear_probe.py",
        str(tiny_supervised_run / "backbone.pt"),
        *("--dataset", "imagefolder", "--data-dir", str(tmp_path / "folder"), "--epochs", "2", "--num-workers", "0"),
        *("--output", str(out)),
        cwd=tmp_path,
    )
    assert json.loads(out.read_text())["train_on"] == "full (imbalanced)"
    assert "probe trained on the full (imbalanced) set" in proc.stdout and "balanced set" not in proc.stdout


def test_probe_takes_a_run_folder(tiny_supervised_run, tmp_path):
    """linear_probe.py runs/<run> said 'checkpoint not found' although the folder exists."""
    out = tmp_path / "probe.json"
    run_script(
        "linear_probe.py",
        str(tiny_supervised_run),
        "--epochs",
        "2",
        "--num-workers",
        "0",
        "--output",
        str(out),
        cwd=tmp_path,
    )
    assert json.loads(out.read_text())["checkpoint"] == str(tiny_supervised_run / "backbone.pt")
    (tmp_path / "empty").mkdir()
    proc = run_script("linear_probe.py", str(tmp_path / "empty"), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "is a folder without backbone.pt or checkpoint.pt" in proc.stderr


def test_probe_knn_default_is_k_20_on_a_long_tail_whose_smallest_class_has_5_images(tiny_supervised_run, tmp_path):
    """The old default, 200 capped at a twentieth of the smallest class, was k = 1 on any natural long tail
    (ImageNet-LT's smallest class has 5 images); DINO's k 20 / T 0.07 holds at any class size. The JSON's top-1 is
    a kNN with those values, computed here on the probe's own features."""
    _grey_folder(tmp_path / "folder", train=(30, 12, 5), val=(3, 3, 3))
    out = tmp_path / "probe.json"
    proc = run_script(
        "linear_probe.py",
        str(tiny_supervised_run / "backbone.pt"),
        *("--dataset", "imagefolder", "--data-dir", str(tmp_path / "folder"), "--epochs", "1", "--num-workers", "0"),
        *("--output", str(out)),
        cwd=tmp_path,
    )
    res = json.loads(out.read_text())
    assert res["num_train"] == 47 and (res["knn"]["k"], res["knn"]["temperature"]) == (20, 0.07)
    assert "| knn (k 20, T 0.07) |" in proc.stdout
    import lt_data

    model, meta = lp.load_backbone(str(tiny_supervised_run / "backbone.pt"))
    data = lt_data.build_data(
        lt_data.DataArgs(
            dataset="imagefolder", data_dir=str(tmp_path / "folder"), image_size=meta["data"]["image_size"]
        )
    )
    tf = lt_data.eval_transform(data.image_size, data.mean, data.std)
    model.eval()
    with torch.no_grad():
        feats = lambda ds: model(torch.stack([tf(ds.image(i)) for i in range(len(ds.targets))]))  # noqa: E731
        train_f, test_f = feats(data.train_full), feats(data.test)
    pred = _reference_knn(train_f, torch.tensor(data.train_full.targets), test_f, 3, 20, 0.07)
    expected = 100 * (pred == torch.tensor(data.test.targets)).double().mean().item()
    assert res["knn"]["top1"] == pytest.approx(expected)


def _long_tail_targets(classes=8142, seed=0):
    """Class labels of an iNaturalist-2018-like long tail: 8,142 classes of 1 to 40 images, shuffled."""
    g = torch.Generator().manual_seed(seed)
    counts = 1 + torch.randint(0, 40, (classes,), generator=g)
    y = torch.repeat_interleave(torch.arange(classes), counts)
    return y[torch.randperm(len(y), generator=g)].tolist(), counts


@pytest.mark.parametrize("total", [1, 5000, 8142, 20000, 100000])
def test_balanced_subset_takes_exactly_total_images_as_balanced_as_the_classes_allow(total):
    targets, counts = _long_tail_targets()
    picked = lp.balanced_subset(targets, total, seed=3)
    assert len(picked) == total and len(set(picked)) == total and picked == sorted(picked)
    got = torch.bincount(torch.tensor(targets)[picked], minlength=len(counts))
    # the level L every class reaches (or all of a class below it), found by counting up; the rest, 1 more each
    level = 0
    while int(counts.clamp(max=level + 1).sum()) <= total:
        level += 1
    base = counts.clamp(max=level)
    extra = got - base
    assert ((extra == 0) | (extra == 1)).all() and int(extra.sum()) == total - int(base.sum())
    assert (got <= counts).all() and (extra[counts <= level] == 0).all()
    if total < len(counts):  # one image each of `total` classes
        assert int((got == 1).sum()) == total and int(got.max()) == 1
    else:  # every class, total // C each at least where the class has that many
        assert (got >= counts.clamp(max=total // len(counts))).all() and (got > 0).all()
    assert picked == lp.balanced_subset(targets, total, seed=3)  # seeded
    assert picked != lp.balanced_subset(targets, total, seed=4)


def test_balanced_subset_keeps_total_c_draws_of_a_balanced_set():
    """When every class has total // C images and C divides total, the choice is class by class in order, each
    the first total // C of a seeded permutation of the class (what the monitor's test also computes)."""
    y = torch.arange(7).repeat(30)
    g = torch.Generator().manual_seed(11)
    expected = sorted(
        torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(30, generator=g)[:5]] for c in range(7)]).tolist()
    )
    assert lp.balanced_subset(y.tolist(), 35, seed=11) == expected
    assert lp.balanced_subset(y.tolist(), 0, seed=11) == list(range(210))
    assert lp.balanced_subset(y.tolist(), 210, seed=11) == list(range(210))


def test_knn_monitor_honours_bank_and_queries_at_8142_classes():
    import numpy as np

    import lt_data

    train_y, _ = _long_tail_targets()
    test_y = torch.arange(8142).repeat(3).tolist()  # iNaturalist 2018's validation set: 3 images a class
    images = lambda y: lt_data.ArrayImages(np.zeros((len(y), 2, 2, 3), np.uint8), y)  # noqa: E731
    data = lt_data.LTData("t", images(train_y), images(test_y), [], [], 8142, 2, (0.5,) * 3, (0.25,) * 3, "oltr")
    monitor = lp.KNNMonitor(data, bank=5000, queries=2000, seed=1)
    assert monitor.sizes == (5000, 2000) and len(monitor.targets) == 7000
    assert monitor.description == (
        "kNN monitor: 5,000 bank images (1 each of 5,000 of 8,142 classes), "
        "2,000 test queries (1 each of 2,000 of 8,142 classes), k 20, T 0.07"
    )
    bank_classes = monitor.targets[:5000]
    assert len(bank_classes.unique()) == 5000
    again = lp.KNNMonitor(data, bank=5000, queries=2000, seed=1)
    assert torch.equal(again.targets, monitor.targets)
    big = lp.KNNMonitor(data, bank=20000, queries=0, seed=1)
    assert big.sizes == (20000, 3 * 8142)
    assert big.description == (
        "kNN monitor: 20,000 bank images (1 to 3 each of 8,142 classes), "
        "24,426 test queries (3 each of 8,142 classes), k 20, T 0.07"
    )


VIT_RESIZES = [(4, 2, 2), (4, 6, 6), (4, 3, 5), (7, 4, 9), (14, 6, 16), (2, 8, 3), (6, 6, 4)]


@pytest.mark.parametrize("grid,h,w", VIT_RESIZES)
def test_vit_position_embedding_resize_is_bicubic_interpolation_by_matmuls(grid, h, w):
    """Up- and downsampling, square or not: the [h*w, D] position embeddings equal F.interpolate's bicubic
    resize of the grid x grid embeddings (align_corners=False), gradients reach pos_embedding, and the autograd
    graph holds no bicubic-upsample backward (which raises under deterministic algorithms on CUDA)."""
    torch.manual_seed(0)
    patch, dim = 2, 8
    vit = lp.build_backbone("vit", **lp.vit_kwargs("vit_tiny", grid * patch, 1, 2, dim, patch)).eval()
    seen = []
    vit.encoder.layers.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = torch.randn(2, 3, h * patch, w * patch)
    out = vit(x)
    pos = vit.encoder.pos_embedding
    expected = torch.nn.functional.interpolate(
        pos[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False
    )
    tokens = vit.conv_proj(x).flatten(2).transpose(1, 2)  # the patch tokens before the position embeddings
    torch.testing.assert_close(
        seen[0][:, 1:] - tokens,
        expected.permute(0, 2, 3, 1).reshape(1, h * w, dim).expand(2, -1, -1),
        atol=1e-6,
        rtol=0,
    )
    seen_nodes, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen_nodes:
            seen_nodes.add(node)
            stack.extend(n for n, _ in node.next_functions)
    names = {type(node).__name__ for node in seen_nodes}
    assert not any("Upsample" in n for n in names) and "MmBackward0" in names
    r = torch.randn(2, h * w, dim)  # the gradient reaching pos_embedding: that of F.interpolate's resize
    (grad,) = torch.autograd.grad((seen[0][:, 1:] * r).sum(), pos, retain_graph=True)
    (expected_grad,) = torch.autograd.grad((expected.permute(0, 2, 3, 1).reshape(1, h * w, dim) * r).sum(), pos)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
    assert grad[0, 1:].abs().min() > 0 or h * w < grid * grid  # every grid point reached when upsampling
    (out * torch.randn_like(out)).sum().backward()
    assert pos.grad[0, 1:].abs().sum() > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the resize stays in float32
        seen.clear()
        vit(x)
        tokens = vit.conv_proj(x).flatten(2).transpose(1, 2)
    assert tokens.dtype == torch.bfloat16 and seen[0].dtype == torch.float32
    resized = (seen[0][:, 1:] - tokens.float())[0]
    torch.testing.assert_close(resized, expected.permute(0, 2, 3, 1).reshape(h * w, dim), atol=1e-6, rtol=0)


def test_vit_resize_runs_under_deterministic_algorithms():
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        vit = lp.build_backbone("vit", **lp.vit_kwargs("vit_tiny", 16, 1, 2, 8, 4))
        out = vit(torch.randn(2, 3, 8, 12))
        (out * torch.randn_like(out)).sum().backward()
        assert vit.encoder.pos_embedding.grad.abs().sum() > 0
    finally:
        torch.use_deterministic_algorithms(was)


# ------------------------------------------------------------------ output, TensorBoard, damaged checkpoints (CLI)


def _probe_error(tmp_path, *args) -> str:
    """``python linear_probe.py ARGS`` must fail before any work with exit code 2 and one line; returns the line."""
    proc = run_script("linear_probe.py", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "extracting" not in proc.stdout, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("linear_probe.py: error: "), proc.stderr
    return lines[0][len("linear_probe.py: error: ") :]


@pytest.mark.parametrize("case", ["--output a folder", "default output a folder", "--output a loop"])
def test_probe_output_path_is_checked_itself_before_any_work(tiny_supervised_run, tmp_path, case):
    """--output naming an existing folder: the whole probe ran, then 'cannot write results: Is a directory', the
    results lost and a stray .part left. The final path (given, or probe_<dataset>.json beside the checkpoint with
    the run's data set) is checked up front, and nothing is left behind."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_supervised_run / "backbone.pt", run / "backbone.pt")
    flags = [str(run / "backbone.pt"), "--num-workers", "0", "--epochs", "1"]
    if case == "--output a folder":
        out = tmp_path / "results"
        out.mkdir()
        flags += ["--output", str(out)]
        expected = f"cannot write the results to {out}: it is a folder"
    elif case == "default output a folder":
        out = run / "probe_synthetic.json"  # the run's data set names the default
        out.mkdir()
        expected = f"cannot write the results to {out}: it is a folder"
    else:
        out = tmp_path / "loop.json"
        out.symlink_to("loop.json")
        flags += ["--output", str(out)]
        expected = f"cannot write the results to {out}: it is a symbolic-link loop"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert _probe_error(tmp_path, *flags).startswith(expected)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no .part, no write test left


def test_probe_tensorboard_with_an_empty_shot_group_logs_the_others(tiny_supervised_run, tmp_path):
    """--tensorboard on an ImageFolder without many- or medium-shot classes: add_scalar(None) raised after the JSON
    was written, exit 1 with a traceback. Groups without classes are skipped; the run ends 0 with its events."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _grey_folder(tmp_path / "folder", train=(6, 6, 6), val=(2, 2, 2))
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_supervised_run / "backbone.pt", run / "backbone.pt")
    proc = run_script(
        "linear_probe.py",
        str(run / "backbone.pt"),
        *("--dataset", "imagefolder", "--data-dir", str(tmp_path / "folder"), "--epochs", "2", "--num-workers", "0"),
        "--tensorboard",
        cwd=tmp_path,
    )
    assert proc.stderr == "" and f"wrote {run / 'probe_imagefolder.json'}" in proc.stdout
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"probe/imagefolder/linear_top1", "probe/imagefolder/knn_few"} <= tags
    assert not any(t.endswith(("_many", "_medium", "_group_std")) for t in tags)


def test_probe_tensorboard_folder_is_checked_before_any_work(tiny_supervised_run, tmp_path):
    """--tensorboard writes its events beside the checkpoint: a folder it cannot write failed after the work."""
    import shutil

    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_supervised_run / "backbone.pt", run / "backbone.pt")
    run.chmod(0o555)
    try:
        message = _probe_error(
            tmp_path, str(run / "backbone.pt"), "--output", str(tmp_path / "p.json"), "--tensorboard"
        )
    finally:
        run.chmod(0o755)
    assert message == f"cannot write TensorBoard events to {run}: Permission denied"


def _damaged(path, case):
    good = path.read_bytes()
    if case == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("not a torch file\n")
    elif case == "no backbone":
        obj = torch.load(path, weights_only=True)
        del obj["backbone"]
        torch.save(obj, path)
    elif case == "bad arch_kwargs":
        obj = torch.load(path, weights_only=True)
        obj["backbone"]["arch_kwargs"] = {"depth": 3}
        obj["backbone"]["arch"] = "vit"
        torch.save(obj, path)
    elif case == "loop":
        path.unlink()
        path.symlink_to(path.name)


@pytest.mark.parametrize(
    "case,words",
    [
        ("truncated", "cannot load {}: not a readable checkpoint"),
        ("empty", "cannot load {}: not a readable checkpoint"),
        ("text", "cannot load {}: not a readable checkpoint"),
        ("no backbone", "{}: a damaged ssl-imbalance-backbone/1 file: expected 'backbone' with arch, arch_kwargs"),
        ("bad arch_kwargs", "{}: a damaged backbone description"),
        ("loop", "checkpoint {}: it is a symbolic-link loop"),
    ],
)
def test_probe_damaged_backbone_file_is_one_line_naming_it(tiny_supervised_run, tmp_path, case, words):
    """A backbone file that is truncated, not a torch file, lacks its description or is a symbolic-link loop: one line
    naming the file (a KeyError / TypeError traceback, or 'not found' for a loop, before)."""
    import shutil

    path = tmp_path / "backbone.pt"
    shutil.copy(tiny_supervised_run / "backbone.pt", path)
    _damaged(path, case)
    message = _probe_error(tmp_path, str(path), "--output", str(tmp_path / "p.json"), "--num-workers", "0")
    assert message.startswith(words.format(path)), message


def test_dino_readout_is_the_class_tokens_of_the_last_blocks_and_the_mean_patch_token():
    """DINO's linear-evaluation features, against torchvision's ViT with forward hooks on its blocks (an independent
    computation): n 1 alone is the backbone's output; n 2 with the mean patch token is [cls_2, cls_3, mean_3]."""
    kw = lp.vit_kwargs("vit_tiny", 16, layers=3, heads=2, dim=32)
    vit = lp.build_backbone("vit", **kw).eval()
    tv = torchvision.models.VisionTransformer(**kw)
    tv.heads = torch.nn.Identity()
    tv.load_state_dict(vit.state_dict(), strict=True)
    tv.eval()
    outputs = []
    for block in tv.encoder.layers:
        block.register_forward_hook(lambda m, i, o: outputs.append(o))
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        final = tv(x)
        normed = [tv.encoder.ln(o) for o in outputs]
        expected = torch.cat([normed[1][:, 0], normed[2][:, 0], normed[2][:, 1:].mean(1)], -1)
        torch.testing.assert_close(vit.readout(x, 2, True), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vit.readout(x, 3), torch.cat([n[:, 0] for n in normed], -1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vit.readout(x), final, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lp.DinoReadout(vit, 2, True)(x), vit.readout(x, 2, True))


def test_probe_reads_a_vit_the_dino_way_and_records_it(tmp_path):
    """--n-last-blocks 2 --avgpool-patchtokens: 3 x 16-d features, recorded in the JSON, its own file name; refused
    beyond the ViT's blocks and for what has no tokens."""
    vit = ["--arch", "vit_tiny", "--vit-layers", "2", "--vit-dim", "16", "--vit-heads", "2", "--patch-size", "4"]
    fast = ["--batch-size", "8", "--max-steps", "1", "--num-workers", "0", "--eval-every", "0", "--run-name", "v"]
    run_script("supervised_baseline.py", *TINY_DATA, *vit, *fast, cwd=tmp_path)
    run = tmp_path / "runs" / "v"
    probe = [str(run), "--epochs", "1", "--num-workers", "0"]
    out = run_script("linear_probe.py", *probe, "--n-last-blocks", "2", "--avgpool-patchtokens", cwd=tmp_path).stdout
    assert "DINO's readout: 48-d features" in out
    res = json.loads((run / "probe_synthetic_last2avg.json").read_text())
    assert res["readout"] == {"n_last_blocks": 2, "avgpool_patchtokens": True} and res["feature_dim"] == 48
    plain = json.loads(
        (run_script("linear_probe.py", *probe, cwd=tmp_path), run / "probe_synthetic.json")[1].read_text()
    )
    assert plain["readout"] == {"n_last_blocks": 1, "avgpool_patchtokens": False} and plain["feature_dim"] == 16
    for flags, message in (
        (["--n-last-blocks", "3"], "--n-last-blocks 3 exceeds the ViT's 2 blocks"),
        (["--n-last-blocks", "2", "--raw-pixels"], "read a ViT's tokens; the raw pixels have none"),
    ):
        proc = run_script("linear_probe.py", *probe, *flags, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().endswith(message), proc.stderr
