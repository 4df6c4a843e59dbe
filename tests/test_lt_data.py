"""lt_data: long-tail counts, twins, shot groups, the real on-disk formats, synthetic data, samplers, CLI."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import lt_data
from conftest import HANG_GUARD, ROOT, run_script, script_env, write_cifar, write_fashion_mnist, write_idx

# ------------------------------------------------------------------ counts against the field's table


def test_cifar10_lt_r100_counts_are_the_standard():
    assert lt_data.long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.mark.parametrize(
    "classes,n_max,ratio,total",
    [
        (10, 5000, 10, 20431),
        (10, 5000, 50, 13996),
        (10, 5000, 100, 12406),
        (100, 500, 10, 19573),
        (100, 500, 50, 12608),
        (100, 500, 100, 10847),
    ],
)
def test_totals_match_the_spec_table(classes, n_max, ratio, total):
    counts = lt_data.long_tail_counts(n_max, classes, ratio)
    assert sum(counts) == total
    assert counts[0] == n_max and counts[-1] == int(n_max / ratio)


def test_step_profile_and_ratio_one():
    assert lt_data.long_tail_counts(500, 10, 10, "step") == [500] * 5 + [50] * 5
    assert lt_data.long_tail_counts(500, 10, 1) == [500] * 10
    with pytest.raises(lt_data.DataError, match="imbalance-ratio"):
        lt_data.long_tail_counts(500, 10, 0.5)


def test_balanced_counts_keep_the_total():
    assert lt_data.balanced_counts(12406, 10) == [1241] * 6 + [1240] * 4
    assert sum(lt_data.balanced_counts(10847, 100)) == 10847


def test_shot_groups_thresholds_and_thirds():
    counts = [1280, 101, 100, 20, 19, 5]
    g = lt_data.shot_groups(counts, "thresholds")
    assert g == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}  # many > 100, medium 20..100, few < 20
    g = lt_data.shot_groups([5, 50, 500, 7, 70, 700, 1000, 1, 2, 3], "thirds")
    assert g == {"many": [2, 4, 5, 6], "medium": [0, 1, 3], "few": [7, 8, 9]}


# ------------------------------------------------------------------ Fashion-MNIST IDX files


def test_fashion_mnist_lt_r100_counts_are_the_cifar_rule():
    expected = [int(6000 * 100 ** (-i / 9)) for i in range(10)]  # class i keeps int(6000 r^(-i/9))
    assert lt_data.long_tail_counts(6000, 10, 100) == expected == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]


@pytest.mark.parametrize("layout,gz", [("debian", True), ("torchvision", False)])
def test_fashion_mnist_loads_from_idx_files_in_both_layouts(tmp_path, layout, gz):
    folder = tmp_path if layout == "debian" else tmp_path / "FashionMNIST" / "raw"
    images, labels = write_fashion_mnist(folder, per_class_train=20, per_class_test=3, gz=gz)
    args = lt_data.DataArgs(dataset="fashion-mnist", data_dir=str(tmp_path), imbalance_ratio=10, download=False)
    data = lt_data.build_data(args)
    assert data.num_classes == 10 and data.image_size == 28 and data.train_full.targets == labels.tolist()
    assert len(data.test) == 30 and lt_data.class_histogram(data.test.targets, 10) == [3] * 10  # balanced test
    assert data.class_counts == [int(20 * 10 ** (-i / 9)) for i in range(10)]
    img = data.train_full.image(7)
    assert img.mode == "RGB" and img.size == (28, 28)
    rgb = pil_to_tensor(img)
    assert all(torch.equal(rgb[c], torch.from_numpy(images[7])) for c in range(3))  # grey copied to 3 channels


def test_fashion_mnist_missing_or_corrupt_files_fail_in_one_line(tmp_path):
    args = lt_data.DataArgs(dataset="fashion-mnist", data_dir=str(tmp_path), download=False)
    with pytest.raises(lt_data.DataError, match="apt-get install dataset-fashion-mnist"):
        lt_data.build_data(args)
    write_fashion_mnist(tmp_path, 2, 1, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")  # 5 said, 2 held
    with pytest.raises(lt_data.DataError, match="train-labels-idx1-ubyte: header says"):
        lt_data.build_data(args)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(7, dtype=np.uint8))  # 20 images, 7 labels
    with pytest.raises(lt_data.DataError, match="do not hold N images"):
        lt_data.build_data(args)


# ------------------------------------------------------------------ CIFAR in torchvision's format


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_files_load_through_the_user_path(tmp_path, name):
    per_class = 50 if name == "cifar10" else 6
    labels = write_cifar(tmp_path, name, per_class, 3)
    args = lt_data.DataArgs(dataset=name, data_dir=str(tmp_path), imbalance_ratio=10, download=False)
    data = lt_data.build_data(args)
    assert len(data.train_full) == len(labels) and data.train_full.targets == labels
    assert len(data.test) == 3 * data.num_classes and data.num_classes == (10 if name == "cifar10" else 100)
    # n_i = int(n_max * 10^(-i/(C-1))): hand values for n_max = 50, C = 10
    expected = (
        [50, 38, 29, 23, 17, 13, 10, 8, 6, 5]
        if name == "cifar10"
        else [max(1, int(6 * 0.1 ** (i / 99))) for i in range(100)]
    )  # a class keeps >= 1
    assert data.class_counts == expected
    assert len(data.twin_indices) == len(data.lt_indices)
    twin = lt_data.class_histogram([labels[i] for i in data.twin_indices], data.num_classes)
    assert max(twin) - min(twin) <= 1
    img = data.train_full.image(0)
    assert img.size == (32, 32) and img.mode == "RGB"


def test_cifar_selection_is_seeded(tmp_path):
    write_cifar(tmp_path, "cifar10", 50, 2)
    a = lt_data.DataArgs(dataset="cifar10", data_dir=str(tmp_path), imbalance_ratio=10, download=False)
    d1, d2 = lt_data.build_data(a), lt_data.build_data(a)
    d3 = lt_data.build_data(dataclasses.replace(a, split_seed=1))
    assert d1.lt_indices == d2.lt_indices and d1.lt_indices != d3.lt_indices
    assert d1.class_counts == d3.class_counts


def test_missing_cifar_offline_says_where_to_put_it(tmp_path):
    args = lt_data.DataArgs(dataset="cifar10", data_dir=str(tmp_path), download=False)
    with pytest.raises(lt_data.DataError, match="cifar-10-batches-py.*synthetic"):
        lt_data.build_data(args)


def test_index_file_replaces_the_construction(tmp_path):
    write_cifar(tmp_path, "cifar10", 20, 2)
    (tmp_path / "split.txt").write_text("0\n5\n7\n100\n")
    args = lt_data.DataArgs(
        dataset="cifar10", data_dir=str(tmp_path), index_file=str(tmp_path / "split.txt"), download=False
    )
    assert lt_data.build_data(args).lt_indices == [0, 5, 7, 100]
    (tmp_path / "bad.txt").write_text("0 99999\n")
    with pytest.raises(lt_data.DataError, match="outside"):
        lt_data.build_data(dataclasses.replace(args, index_file=str(tmp_path / "bad.txt")))


# ------------------------------------------------------------------ ImageNet-LT split files and ImageFolder


def _write_tree(root, split, counts, size=20):
    lines = []
    for c, n in enumerate(counts):
        (root / split / f"n{c:04d}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rel = f"{split}/n{c:04d}/img{i}.png"
            Image.new("RGB", (size, size), (c * 40 % 256, i * 10 % 256, 0)).save(root / rel)
            lines.append(f"{rel} {c}")
    return lines


def test_imagenet_lt_split_files(tmp_path):
    train = _write_tree(tmp_path, "train", [6, 3, 1])
    test = _write_tree(tmp_path, "val", [2, 2, 2])
    (tmp_path / "LT_train.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "LT_test.txt").write_text("\n".join(test) + "\n")
    args = lt_data.DataArgs(
        dataset="imagenet-lt", data_dir=str(tmp_path), split_file=str(tmp_path / "LT_train.txt"), image_size=16
    )
    data = lt_data.build_data(args)
    assert data.class_counts == [6, 3, 1] and len(data.test) == 6  # used as is
    assert data.groups == {"many": [], "medium": [], "few": [0, 1, 2]}  # ImageNet-LT thresholds
    ds = lt_data.IndexedDataset(data.train_full, data.lt_indices, lt_data.eval_transform(16, data.mean, data.std))
    x, y, k = ds[9]
    assert x.shape == (3, 16, 16) and y == 2 and k == 9
    # unknown paths: one clear error naming the first missing file
    (tmp_path / "LT_train.txt").write_text("train/nope/x.png 0\n" + "\n".join(train))
    with pytest.raises(lt_data.DataError, match="not found.*nope/x.png"):
        lt_data.build_data(args)
    with pytest.raises(lt_data.DataError, match="split file not found"):
        lt_data.build_data(dataclasses.replace(args, split_file=str(tmp_path / "missing_train.txt")))


def test_imagefolder_as_is_and_long_tailed(tmp_path):
    _write_tree(tmp_path, "train", [8, 8, 8, 8])
    _write_tree(tmp_path, "val", [1, 1, 1, 1])
    args = lt_data.DataArgs(dataset="imagefolder", data_dir=str(tmp_path), image_size=16)
    assert lt_data.build_data(args).class_counts == [8, 8, 8, 8]
    lt = lt_data.build_data(dataclasses.replace(args, imbalance_ratio=8))
    assert lt.class_counts == [8, 4, 2, 1] and len(lt.twin_indices) == 15
    (tmp_path / "val" / "extra").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "extra" / "a.png")
    with pytest.raises(lt_data.DataError, match="class count mismatch"):
        lt_data.build_data(args)


def _add_hidden_entries(root):
    """What macOS and notebooks leave in a copied image tree: AppleDouble ._x.png files (not images),
    .DS_Store, and hidden folders (which would otherwise be taken for classes)."""
    for split in ("train", "val"):
        for cls in (root / split).iterdir():
            (cls / "._img0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
            (cls / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
            (cls / ".thumbs").mkdir()
            Image.new("RGB", (4, 4)).save(cls / ".thumbs" / "img0.png")
        (root / split / ".ipynb_checkpoints").mkdir()
        Image.new("RGB", (4, 4)).save(root / split / ".ipynb_checkpoints" / "x.png")


def test_imagefolder_never_lists_hidden_files(tmp_path):
    _write_tree(tmp_path, "train", [4, 3])
    _write_tree(tmp_path, "val", [1, 1])
    _add_hidden_entries(tmp_path)
    data = lt_data.build_data(lt_data.DataArgs(dataset="imagefolder", data_dir=str(tmp_path), image_size=16))
    assert data.num_classes == 2 and data.class_counts == [4, 3] and len(data.test) == 2
    assert not any("/." in p for p in data.train_full.files + data.test.files)


def test_training_on_an_imagefolder_with_macos_metadata_finishes(tmp_path):
    _write_tree(tmp_path, "train", [8, 8])
    _write_tree(tmp_path, "val", [1, 1])
    _add_hidden_entries(tmp_path)
    proc = run_script(
        "supervised_baseline.py",
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(tmp_path),
        "--image-size",
        "16",
        "--batch-size",
        "8",
        "--max-steps",
        "2",
        "--num-workers",
        "0",
        cwd=tmp_path,
    )
    assert "done: step 2" in proc.stdout


def truncated_jpeg(path, size=20):
    """A JPEG cut in half: its header is fine, decoding fails with 'image file is truncated'."""
    import io

    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), bytes(torch.randint(0, 256, (size * size * 3,)).tolist())).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_every_unreadable_image_is_a_data_error_naming_the_file(tmp_path):
    import os

    truncated, text, empty, locked = (tmp_path / n for n in ("t.jpg", "t.png", "e.png", "l.png"))
    truncated_jpeg(truncated)
    text.write_text("not an image")
    empty.write_bytes(b"")
    Image.new("RGB", (4, 4)).save(locked)
    images = lt_data.FileImages(str(tmp_path), [p.name for p in (truncated, text, empty, locked)], [0] * 4)
    for i, words in enumerate(("[Tt]runcated", "cannot identify", "the file is empty .0 bytes.")):
        with pytest.raises(lt_data.DataError, match=f"cannot read image {images.path(i)}: {words}"):
            images.image(i)
    if os.geteuid() != 0:  # root reads anything
        os.chmod(locked, 0)
        with pytest.raises(lt_data.DataError, match=f"cannot read image {locked}: .*Permission denied"):
            images.image(3)
    # indexing stats no file (issue 33): an empty image in an ImageFolder is found when it is read, in one line
    _write_tree(tmp_path / "d", "train", [2, 2])
    _write_tree(tmp_path / "d", "val", [1, 1])
    args = lt_data.DataArgs(dataset="imagefolder", data_dir=str(tmp_path / "d"), image_size=16)
    (tmp_path / "d" / "train" / "n0001" / "img1.png").write_bytes(b"")
    data = lt_data.build_data(args)
    assert data.train_full.files[3] == "train/n0001/img1.png"
    with pytest.raises(lt_data.DataError, match=r"cannot read image .*/d/train/n0001/img1.png: the file is empty"):
        data.train_full.image(3)


def test_error_line_unwraps_a_dataloader_worker_error():
    from torch._utils import ExceptionWrapper

    try:
        raise lt_data.DataError("cannot read image a/b.jpg: image file is truncated")
    except lt_data.DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(lt_data.DataError) as e:
        wrapped.reraise()
    assert lt_data.error_line(e.value) == "cannot read image a/b.jpg: image file is truncated"


# ------------------------------------------------------------------ synthetic data


def _pixels(img):
    return pil_to_tensor(img)


def test_synthetic_is_deterministic_and_split_dependent():
    a = lt_data.SyntheticImages(5, 4, 24, seed=3, train=True)
    b = lt_data.SyntheticImages(5, 4, 24, seed=3, train=True)
    t = lt_data.SyntheticImages(5, 4, 24, seed=3, train=False)
    assert torch.equal(_pixels(a.image(7)), _pixels(b.image(7)))
    assert not torch.equal(_pixels(a.image(7)), _pixels(t.image(7)))
    assert a.image(0).size == (24, 24) and len(a) == 20


def _nearest_mean_accuracy(ftr, ytr, fte, yte):
    means = torch.stack([ftr[ytr == c].mean(0) for c in range(int(ytr.max()) + 1)])
    return (torch.cdist(fte, means).argmin(1) == yte).float().mean().item()


def test_synthetic_classes_are_not_separable_by_mean_colour_but_by_structure():
    def feats(ds):
        xs = torch.stack([_pixels(ds.image(i)).float() / 255 for i in range(len(ds))])
        colour = xs.mean((2, 3))
        spectrum = torch.fft.fft2(xs.mean(1)).abs()[:, :8, :8].flatten(1).log1p()  # orientation/frequency energy
        return colour, spectrum, torch.tensor(ds.targets)

    c_tr, s_tr, y_tr = feats(lt_data.SyntheticImages(10, 60, 32, 0, True))
    c_te, s_te, y_te = feats(lt_data.SyntheticImages(10, 30, 32, 0, False))
    by_colour = _nearest_mean_accuracy(c_tr, y_tr, c_te, y_te)
    by_structure = _nearest_mean_accuracy(s_tr, y_tr, s_te, y_te)
    assert by_colour < 0.2  # chance is 0.1
    assert by_structure > 0.4  # the class is in the pattern
    assert by_structure < 0.95  # ...but not trivially


# ------------------------------------------------------------------ views and samplers


def test_views_shapes_and_index():
    data = lt_data.build_data(lt_data.DataArgs(dataset="synthetic", synthetic_per_class=8, imbalance_ratio=2))
    two = lt_data.IndexedDataset(
        data.train_full, data.lt_indices, lt_data.TwoViews(lt_data.ssl_augment(32, data.mean, data.std))
    )
    views, y, k = two[(3, 123)]
    assert len(views) == 2 and views[0].shape == (3, 32, 32) and k == 3
    assert y == data.train_full.targets[data.lt_indices[3]]
    again, _, _ = two[(3, 123)]
    assert torch.equal(views[0], again[0]) and not torch.equal(views[0], views[1])  # seeded, independent views
    mc = lt_data.MultiCrop(32, 16, 2, 3, data.mean, data.std)(data.train_full.image(0))
    assert [v.shape[-1] for v in mc] == [32, 32, 16, 16, 16]
    big = lt_data.ssl_augment(224, data.mean, data.std)(Image.new("RGB", (300, 260)))
    assert big.shape == (3, 224, 224)
    assert lt_data.eval_transform(224, data.mean, data.std)(Image.new("RGB", (300, 260))).shape == (3, 224, 224)


def _edge_sigma(img: Image.Image) -> float:
    """The blur's sigma in pixels, read off a blurred vertical step edge: the std of the profile's derivative."""
    d = np.diff(np.asarray(img)[32, :, 0].astype(float))
    d /= d.sum()
    x = np.arange(len(d))
    return float(np.sqrt((d * (x - (d * x).sum()) ** 2).sum()))


def test_blur_blurs_with_the_papers_sigma_range():
    """SimSiam/MoCo v2/DINO: Gaussian blur, sigma ~ U(0.1, 2.0) px. Each draw comes from torch's RNG (so a seeded
    sample repeats it) and the blur it applies has that sigma (the step edge's profile is the Gaussian's CDF)."""
    edge = np.zeros((64, 64, 3), np.uint8)
    edge[:, 32:] = 255
    edge = Image.fromarray(edge)
    blur, draws, measured = lt_data.GaussianBlur((0.1, 2.0)), [], []
    for seed in range(200):
        torch.manual_seed(seed)
        draws.append(torch.empty(1).uniform_(0.1, 2.0).item())
        torch.manual_seed(seed)
        measured.append(_edge_sigma(blur(edge)))
    draws, measured = np.array(draws), np.array(measured)
    assert draws.min() < 0.2 and draws.max() > 1.9  # the whole range is drawn
    visible = draws > 0.4  # below ~0.4 px a blur barely moves a pixel value
    assert np.abs(measured[visible] - draws[visible]).max() < 0.05
    assert measured.max() < 2.05
    # in the augmentation: p .5 at ImageNet sizes (>= 96 px), never at CIFAR sizes
    ops = {size: lt_data.ssl_augment(size, (0.5,) * 3, (0.25,) * 3).transforms for size in (224, 32)}
    applied = [
        op for op in ops[224] if isinstance(op, T.RandomApply) and isinstance(op.transforms[0], lt_data.GaussianBlur)
    ]
    assert len(applied) == 1 and applied[0].p == 0.5 and applied[0].transforms[0].sigma == (0.1, 2.0)
    assert not any("GaussianBlur" in repr(op) for op in ops[32])


def test_sampler_ranks_partition_the_single_process_batches():
    one = list(lt_data.ResumableSampler(23, 1, 0, seed=5))
    r0, r1 = list(lt_data.ResumableSampler(23, 2, 0, seed=5)), list(lt_data.ResumableSampler(23, 2, 1, seed=5))
    B = 4  # 2 processes x B == 1 process x 2B, batch by batch
    for b in range(len(r0) // B):
        assert sorted(r0[b * B : (b + 1) * B] + r1[b * B : (b + 1) * B]) == sorted(one[2 * b * B : 2 * (b + 1) * B])
    assert sorted(i for i, _, _ in one) == list(range(23))
    assert len(r0) == len(r1) == 11 and len(r0) // B == len(one) // (2 * B)  # same number of steps


def test_sampler_resume_skips_exactly_and_epochs_differ():
    s = lt_data.ResumableSampler(20, 2, 1, seed=0)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, skip=4)
    assert list(s) == full[4:] and len(s) == len(full) - 4
    s.set_epoch(4)
    assert list(s) != full


def test_class_balanced_sampler_equalises_classes():
    labels = [0] * 90 + [1] * 9 + [2] * 1
    s = lt_data.ResumableSampler(len(labels), labels=labels, seed=0)
    counts = torch.zeros(3)
    for e in range(30):
        s.set_epoch(e)
        for i, _, epoch in s:
            assert epoch == e
            counts[labels[i]] += 1
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.03


def test_works_with_distributed_sampler():
    data = lt_data.build_data(lt_data.DataArgs(dataset="synthetic", synthetic_per_class=8, imbalance_ratio=2))
    ds = lt_data.IndexedDataset(data.train_full, data.lt_indices, lt_data.eval_transform(32, data.mean, data.std))
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=0)
    x, y, k = next(iter(lt_data.make_loader(ds, 4, 0, sampler)))
    assert x.shape == (4, 3, 32, 32) and k.tolist() == list(sampler)[:4]


# ------------------------------------------------------------------ command line


def test_cli_prints_the_split(tmp_path):
    write_cifar(tmp_path, "cifar10", 50, 1)
    out = run_script(
        "lt_data.py",
        "--dataset",
        "cifar10",
        "--data-dir",
        str(tmp_path),
        "--imbalance-ratio",
        "10",
        "--no-download",
        cwd=tmp_path,
    ).stdout
    assert "50, 38, 29, 23, 17, 13, 10, 8, 6, 5" in out and "199 images" in out
    assert "many" in out and "balanced twin: 199 images" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "synthetic", "--imbalance-ratio", "0.5"], "imbalance-ratio must be >= 1"),
        (["--dataset", "imagenet-lt", "--split-file", "missing_train.txt"], "split file not found"),
        (["--dataset", "cifar10", "--data-dir", "nowhere", "--no-download"], "not found"),
    ],
)
def test_cli_bad_arguments_one_line(tmp_path, args, message):
    proc = run_script("lt_data.py", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_cli_unknown_dataset_is_refused(tmp_path):
    proc = run_script("lt_data.py", "--dataset", "mnist", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "mnist" in proc.stderr


def test_to_normalized_tensor_equals_to_tensor_then_normalize():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8))
    ours = lt_data.ToNormalizedTensor(mean, std)(img)
    reference = T.Normalize(mean, std)(T.ToTensor()(img))
    assert ours.dtype == torch.float32 and ours.shape == (3, 7, 9)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_an_error_in_a_loop_over_the_loader_ends_the_process_and_its_workers(tmp_path):
    """Workers that ignored SIGTERM made every exit with live workers hang: the DataLoader's and multiprocessing's
    clean-up end them with SIGTERM. An uncaught error in a loop over make_loader(num_workers=2) must end the main
    process and every worker within seconds."""
    code = f"""
import os, sys, time, torch
import lt_data
class Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 10_000
    def __getitem__(self, i):
        open(os.path.join({str(tmp_path)!r}, str(os.getpid())), "w").close()
        time.sleep(0.5)  # a worker busy decoding when the error comes
        return torch.zeros(3, 8, 8)
for batch in lt_data.make_loader(Pids(), 4, 2):
    raise ValueError("an error in the user's loop")
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=script_env(),
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=HANG_GUARD)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for p in tmp_path.iterdir():
            os.kill(int(p.name), signal.SIGKILL) if not _gone(int(p.name)) else None
        pytest.fail(f"the process did not exit within {HANG_GUARD} s of the error")
    assert proc.returncode == 1 and "an error in the user's loop" in err
    workers = [int(p.name) for p in tmp_path.iterdir()]
    assert workers
    deadline = time.monotonic() + HANG_GUARD
    while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(pid) for pid in workers), "a DataLoader worker outlived its main process"


def test_the_default_worker_count_follows_the_cpus_this_process_may_use():
    """min(8, os.cpu_count()) started 2 workers on 1 usable core (taskset, cgroups, SLURM)."""
    code = "import lt_data; print(lt_data.make_loader([0], 1, None).num_workers, lt_data.usable_cpus())"
    out = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code],
        env=script_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["1", "1"]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32", "latin-1"])
def test_list_files_parse_in_the_encodings_editors_save(tmp_path, encoding):
    """A UTF-8 BOM made the split file name a file that exists as missing, and the index file 'not integers';
    Windows Notepad's 'Unicode' is UTF-16 with a BOM. Through the lt_data command line, as a user inspects a split."""
    train = _write_tree(tmp_path, "train", [6, 3, 1])
    test = _write_tree(tmp_path, "val", [2, 2, 2])
    (tmp_path / "LT_train.txt").write_bytes(("\r\n".join(train) + "\r\n").encode(encoding))
    (tmp_path / "LT_test.txt").write_bytes("\n".join(test).encode(encoding))
    split = ["--dataset", "imagenet-lt", "--data-dir", str(tmp_path), "--split-file", str(tmp_path / "LT_train.txt")]
    out = run_script("lt_data.py", *split, "--image-size", "16", cwd=tmp_path).stdout
    assert "6, 3, 1" in out
    (tmp_path / "idx.txt").write_bytes("0\n6\n9\n".encode(encoding))  # one image of each class
    out = run_script("lt_data.py", *split, "--index-file", str(tmp_path / "idx.txt"), cwd=tmp_path).stdout
    assert "per-class counts: 1, 1, 1" in out


def test_sixteen_bit_grey_images_read_with_their_values(tmp_path):
    """convert("RGB") clipped 16-bit values: a PNG of 25,700 (100/255 of 65,535) read as white (255)."""
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / split / str(c)).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8), 25700 * (c + 1), dtype=np.uint16)).save(
                    tmp_path / split / str(c) / f"{i}.png"
                )
    data = lt_data.build_data(lt_data.DataArgs(dataset="imagefolder", data_dir=str(tmp_path), image_size=8))
    assert Image.open(data.train_full.path(0)).mode == "I;16"
    assert np.asarray(data.train_full.image(0)).tolist() == np.full((8, 8, 3), 100).tolist()
    assert np.asarray(data.train_full.image(2)).max() == 200
    for mode, array in (("I", np.full((8, 8), 7, dtype=np.int32)), ("F", np.full((8, 8), 0.5, dtype=np.float32))):
        Image.fromarray(array).save(tmp_path / "train" / "0" / "0.tif")
        img = lt_data.FileImages(str(tmp_path), ["train/0/0.tif"], [0])
        with pytest.raises(lt_data.DataError, match=f"0.tif: mode {mode} .* has no 0..255 range"):
            img.image(0)


@pytest.mark.parametrize("where", ["image", "class folder", "nested folder"])
def test_a_dangling_symlink_in_an_image_folder_is_named_in_one_line(tmp_path, where):
    """A link to a storage mount that is not there: an image gave a FileNotFoundError traceback, a class folder was
    silently dropped (2 classes instead of 3)."""
    _write_tree(tmp_path, "train", [3, 3])
    _write_tree(tmp_path, "val", [1, 1, 1])
    link = {
        "image": tmp_path / "train" / "n0000" / "gone.png",
        "class folder": tmp_path / "train" / "n0002",
        "nested folder": tmp_path / "train" / "n0001" / "more",
    }[where]
    link.symlink_to(tmp_path / "mnt" / "gone")
    proc = run_script("lt_data.py", "--dataset", "imagefolder", "--data-dir", str(tmp_path), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        proc.stderr.strip()
        == f"lt_data.py: error: {link} is a symbolic link to {tmp_path / 'mnt' / 'gone'}, which is not there"
    )


def test_fashion_mnist_is_found_where_debian_installs_it(tmp_path, monkeypatch):
    """--dataset fashion-mnist without --data-dir: data/ first, then Debian's folder; the run says which it read. An
    explicit --data-dir without the files is never swapped for another folder."""
    debian = tmp_path / "usr-share"
    write_fashion_mnist(debian, per_class_train=12, per_class_test=2)
    monkeypatch.setattr(lt_data, "FASHION_MNIST_DEBIAN", str(debian))
    monkeypatch.chdir(tmp_path)
    args = lt_data.DataArgs(dataset="fashion-mnist", download=False, imbalance_ratio=2)
    assert lt_data.build_data(args).source == str(debian)
    write_fashion_mnist(tmp_path / "data", per_class_train=12, per_class_test=2, seed=1)
    assert lt_data.build_data(args).source == "data"  # data/ holds the files: it wins
    with pytest.raises(lt_data.DataError, match="fashion-mnist not found in elsewhere .* apt-get install"):
        lt_data.build_data(dataclasses.replace(args, data_dir="elsewhere"))
    fm = tmp_path / "data"
    out = run_script(
        "supervised_baseline.py",
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        str(fm),
        "--imbalance-ratio",
        "2",
        "--image-size",
        "8",
        "--batch-size",
        "8",
        "--max-steps",
        "1",
        "--num-workers",
        "0",
        "--eval-every",
        "0",
        cwd=tmp_path,
    ).stdout
    assert out.startswith(f"supervised: 83 training images from {fm}, 10 classes")  # 12 ... 6 a class at r = 2


# ------------------------------------------------------------------ malformed and unreadable inputs, one class (CLI)


def _cli_error(tmp_path, *args) -> str:
    """``python lt_data.py ARGS`` must fail with exit code 2 and one line, no traceback; returns the line. In-process
    (its ``main``, what the command runs: no interpreter and torch start per case); a traceback fails the test."""
    err, cwd = io.StringIO(), os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
            lt_data.main([str(a) for a in args])
    finally:
        os.chdir(cwd)
    lines = err.getvalue().strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("lt_data.py: error: "), err.getvalue()
    return lines[0][len("lt_data.py: error: ") :]


def test_a_bad_data_file_through_the_real_command_line(tmp_path):
    """The in-process cases above, once through ``python lt_data.py``: exit code 2, one line on stderr."""
    write_fashion_mnist(tmp_path, 2, 1, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    proc = run_script("lt_data.py", "--dataset", "fashion-mnist", "--data-dir", ".", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("lt_data.py: error: ")
    assert "train-images-idx3-ubyte is not an IDX file" in proc.stderr, proc.stderr


def _split_files(tmp_path, train_counts=(3, 2), val_counts=(1, 1)) -> list[str]:
    """ImageNet-LT split files LT_train.txt / LT_test.txt over an image tree; the imagenet-lt flags."""
    train = _write_tree(tmp_path, "train", train_counts, size=8)
    test = _write_tree(tmp_path, "val", val_counts, size=8)
    (tmp_path / "LT_train.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "LT_test.txt").write_text("\n".join(test) + "\n")
    return ["--dataset", "imagenet-lt", "--data-dir", str(tmp_path), "--split-file", str(tmp_path / "LT_train.txt")]


@pytest.mark.parametrize("kind", ["imagefolder", "split file", "index file", "index file of a folder"])
def test_a_data_set_of_one_class_is_refused_naming_its_source(tmp_path, kind):
    """An ImageFolder of one class trained silently with loss 0.0000 and a 100% kNN monitor and probe. Every dataset
    kind refuses fewer than 2 classes in the training set or in the long-tailed set an index file keeps."""
    if kind == "imagefolder":
        _write_tree(tmp_path, "train", [3], size=8)
        _write_tree(tmp_path, "val", [1], size=8)
        message = _cli_error(tmp_path, "--dataset", "imagefolder", "--data-dir", str(tmp_path))
        expected = f"image folder {tmp_path / 'train'}: all 3 training images are of one class (class folder n0000)"
    elif kind == "split file":
        flags = _split_files(tmp_path, (3, 2), (1, 1))
        lines = (tmp_path / "LT_train.txt").read_text().splitlines()
        (tmp_path / "LT_train.txt").write_text("\n".join(line.rsplit(" ", 1)[0] + " 0" for line in lines) + "\n")
        message = _cli_error(tmp_path, *flags)
        expected = f"split file {tmp_path / 'LT_train.txt'}: all 5 training images are of one class (class 0)"
    elif kind == "index file":
        labels = write_cifar(tmp_path, "cifar10", 5, 1)
        (tmp_path / "idx.txt").write_text(" ".join(str(i) for i, y in enumerate(labels) if y == 3) + "\n")
        message = _cli_error(
            tmp_path, "--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-download", "--index-file", "idx.txt"
        )
        expected = "index file idx.txt: its 5 images are all of one class (class 3; the data has 10)"
    else:
        _write_tree(tmp_path, "train", [3, 2], size=8)
        _write_tree(tmp_path, "val", [1, 1], size=8)
        (tmp_path / "idx.txt").write_text("3\n4\n")
        message = _cli_error(
            tmp_path, "--dataset", "imagefolder", "--data-dir", str(tmp_path), "--index-file", "idx.txt"
        )
        expected = "index file idx.txt: its 2 images are all of one class (class folder n0001; the data has 2)"
    assert message.startswith(expected) and message.endswith("needs >= 2 classes"), message


def _damage_gzip(path):
    """Flip a byte inside the deflate stream of a gzip file (written again without a file name in its header, which
    is then 10 bytes long): zlib.error on reading."""
    import gzip

    raw = bytearray(gzip.compress(gzip.decompress(path.read_bytes()), mtime=0))
    raw[12] ^= 0xFF
    path.write_bytes(bytes(raw))


IDX_FAULTS = {
    # what is wrong -> (how to make it from good files in d, the file named, words of the message)
    "damaged deflate stream": (
        lambda d: (
            write_idx(d / "train-images-idx3-ubyte.gz", np.zeros((20, 28, 28), np.uint8)),
            _damage_gzip(d / "train-images-idx3-ubyte.gz"),
        ),
        "train-images-idx3-ubyte.gz",
        "cannot read {}: damaged gzip file",
    ),
    "truncated gzip": (
        lambda d: (d / "train-labels-idx1-ubyte.gz").write_bytes((d / "train-labels-idx1-ubyte.gz").read_bytes()[:-12]),
        "train-labels-idx1-ubyte.gz",
        "cannot read {}: the gzip stream is truncated",
    ),
    "not gzip": (
        lambda d: (d / "t10k-labels-idx1-ubyte.gz").write_bytes(b"plain text, not gzip"),
        "t10k-labels-idx1-ubyte.gz",
        "cannot read {}: damaged gzip file",
    ),
    "empty": (
        lambda d: write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(0, np.uint8))
        or (d / "train-labels-idx1-ubyte.gz").write_bytes(__import__("gzip").compress(b"")),
        "train-labels-idx1-ubyte.gz",
        "{} is not an IDX file of unsigned bytes (magic missing: empty file)",
    ),
    "bad magic": (
        lambda d: (d / "train-labels-idx1-ubyte.gz").write_bytes(__import__("gzip").compress(b"\x00\x00\x0d\x01abcd")),
        "train-labels-idx1-ubyte.gz",
        "{} is not an IDX file of unsigned bytes (magic 00000d01)",
    ),
    "header cut off": (
        lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(__import__("gzip").compress(b"\x00\x00\x08\x03\x00")),
        "train-images-idx3-ubyte.gz",
        "{}: the IDX header of 3 sizes is cut off (5 bytes)",
    ),
    "truncated payload": (
        lambda d: (d / "t10k-images-idx3-ubyte.gz").write_bytes(
            __import__("gzip").compress(
                __import__("gzip").decompress((d / "t10k-images-idx3-ubyte.gz").read_bytes())[:-5]
            )
        ),
        "t10k-images-idx3-ubyte.gz",
        "{}: header says (10, 28, 28) (7840 bytes), the file holds 7835",
    ),
    "images of two dimensions": (
        lambda d: write_idx(d / "train-images-idx3-ubyte.gz", np.zeros((20, 784), np.uint8)),
        "train-images-idx3-ubyte.gz",
        "{}: expected images [N, H, W], the IDX header says (20, 784)",
    ),
    "labels of two dimensions": (
        lambda d: write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros((20, 1), np.uint8)),
        "train-labels-idx1-ubyte.gz",
        "{}: expected labels [N], the IDX header says (20, 1)",
    ),
    "count mismatch": (
        lambda d: write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(7, np.uint8)),
        "train-images-idx3-ubyte.gz",
        "{} and ",
    ),
}


@pytest.mark.parametrize("fault", list(IDX_FAULTS))
def test_a_malformed_idx_file_is_one_line_naming_it(tmp_path, fault):
    """A Fashion-MNIST .gz whose deflate stream is damaged gave a zlib.error traceback; every malformation of an IDX
    file (raw or gzipped) is one line naming the file."""
    write_fashion_mnist(tmp_path, per_class_train=2, per_class_test=1)
    make, name, words = IDX_FAULTS[fault]
    make(tmp_path)
    message = _cli_error(tmp_path, "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--no-download")
    assert message.startswith(words.format(tmp_path / name)), message


def _pickle_to(path, obj):
    import pickle

    path.write_bytes(pickle.dumps(obj))


CIFAR_FAULTS = {
    "not a pickle": (lambda p: p.write_text("hello"), "cannot read {}: not a CIFAR python batch"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:100]), "cannot read {}: not a CIFAR python batch"),
    "empty": (lambda p: p.write_bytes(b""), "cannot read {}: not a CIFAR python batch"),
    "not a dict": (lambda p: _pickle_to(p, [1, 2, 3]), "{} is not a CIFAR python batch: expected a dict"),
    "missing key": (
        lambda p: _pickle_to(p, {"data": np.zeros((2, 3072), np.uint8)}),
        "{} is not a CIFAR python batch: expected a dict with 'data' and 'labels', found keys 'data'",
    ),
    "wrong shape": (
        lambda p: _pickle_to(p, {"data": np.zeros((2, 1000), np.uint8), "labels": [0, 1]}),
        "{}: 'data' must be N rows of 3x32x32 uint8 pixels, found uint8 (2, 1000)",
    ),
    "wrong label count": (
        lambda p: _pickle_to(p, {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1, 2]}),
        "{}: 'labels' must be 2 integer labels (one per row of 'data'), found int64 (3,)",
    ),
}


@pytest.mark.parametrize("fault", list(CIFAR_FAULTS))
def test_a_malformed_cifar_batch_is_one_line_naming_it(tmp_path, fault):
    """A CIFAR python batch without its keys or with other shapes gave a KeyError / reshape traceback."""
    write_cifar(tmp_path, "cifar10", 5, 1)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    make, words = CIFAR_FAULTS[fault]
    make(path)
    message = _cli_error(tmp_path, "--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-download")
    assert message.startswith(words.format(path)), message


SPLIT_FAULTS = {
    # what is wrong -> (the bytes of the faulty line 2, the message after "LT_train.txt:2: ")
    "no label": (b"train/n0000/img1.png", "expected 'relative/path label', got 'train/n0000/img1.png'"),
    "non-integer label": (b"train/n0000/img1.png one", "the label must be an integer >= 0"),
    "negative label": (b"train/n0000/img1.png -1", "the label must be an integer >= 0 (expected 'relative/path"),
    "non-UTF-8 name": (
        b"train/n0000/caf\xe9.png 0",
        "2 listed images not found under {root} (first: train/n0000/caf\xe9.png); the file is not UTF-8 (line 2)",
    ),
    "non-UTF-8 label": (b"train/n0000/img1.png \xb9", "the label must be an integer >= 0"),
}


@pytest.mark.parametrize("fault", [*SPLIT_FAULTS, "empty"])
def test_a_malformed_split_file_is_one_line_naming_its_line(tmp_path, fault):
    """Every malformation of an ImageNet-LT split file names the file and the line: a negative label was taken (and
    then misreported as a class count mismatch), a non-UTF-8 file was read as Latin-1 and its names not found
    without saying where."""
    flags = _split_files(tmp_path)
    path = tmp_path / "LT_train.txt"
    if fault == "empty":
        path.write_bytes(b"\n\n")
        assert _cli_error(tmp_path, *flags) == f"split file {path} lists no images"
        return
    line, words = SPLIT_FAULTS[fault]
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join([lines[0], line, *lines[2:], b"train/n0001/gone.png 1"]) + b"\n")
    message = _cli_error(tmp_path, *flags)
    assert message.startswith(f"{path}:2: " + words.format(root=tmp_path)), message


@pytest.mark.parametrize(
    "content,words",
    [
        (b"0 1\n2 x3\n", "{}:2: expected whitespace-separated integer indices, got 'x3'"),
        (b"0\n1.5\n", "{}:2: expected whitespace-separated integer indices, got '1.5'"),
        (b"0 1\n\n-1\n", "{}:3: index -1 is outside 0..49 (the training set has 50 images)"),
        (b"0 1\n50\n", "{}:2: index 50 is outside 0..49"),
        (b"0 1\n2 1\n", "{}:2: index 1 is listed twice (first on line 1)"),
        (b"0 1\n\xb92\n", "{}:2: expected whitespace-separated integer indices"),
        (b" \n\n", "{} holds no index"),
    ],
    ids=["word", "float", "negative", "too large", "twice", "non-UTF-8", "empty"],
)
def test_a_malformed_index_file_is_one_line_naming_its_line(tmp_path, content, words):
    """An --index-file fault named neither the line nor the token; an index listed twice counted its image twice."""
    write_cifar(tmp_path, "cifar10", 5, 1)
    (tmp_path / "idx.txt").write_bytes(content)
    flags = ["--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-download"]
    message = _cli_error(tmp_path, *flags, "--index-file", str(tmp_path / "idx.txt"))
    assert message.startswith(words.format(tmp_path / "idx.txt")), message


def _loop(path):
    """A symbolic link to itself: ELOOP on every use."""
    path.symlink_to(path.name)


@pytest.mark.parametrize(
    "where",
    [
        "image",
        "class folder",
        "link to a folder above",
        "data dir",
        "split file",
        "split file folder",
        "listed image",
        "index file",
        "cifar folder",
        "idx file",
        "split file is a folder",
        "data dir is a file",
    ],
)
def test_an_os_error_on_a_user_path_says_what_it_is(tmp_path, where):
    """A symbolic-link loop in an ImageFolder was reported as a link whose target "is not there", under a path
    repeated 40 times; every path the user names is worded from its OSError's errno (a loop, a file in the way, a
    folder for a file), not assumed missing."""
    flags = ["--dataset", "imagefolder", "--data-dir", str(tmp_path)]
    if where in ("image", "class folder", "link to a folder above", "data dir", "data dir is a file"):
        _write_tree(tmp_path, "train", [2, 2], size=8)
        _write_tree(tmp_path, "val", [1, 1], size=8)
    if where == "image":
        _loop(tmp_path / "train" / "n0000" / "x.png")
        expected = f"{tmp_path / 'train' / 'n0000' / 'x.png'} is a symbolic-link loop"
    elif where == "class folder":
        _loop(tmp_path / "train" / "n0002")
        expected = f"{tmp_path / 'train' / 'n0002'} is a symbolic-link loop"
    elif where == "link to a folder above":
        (tmp_path / "train" / "n0001" / "up").symlink_to("..")
        expected = (
            f"{tmp_path / 'train' / 'n0001' / 'up'} is a symbolic-link loop: it links to .., a folder that holds it"
        )
    elif where == "data dir":
        _loop(tmp_path / "loop")
        flags = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "loop")]
        expected = f"image folder {tmp_path / 'loop' / 'train'}: {tmp_path / 'loop'} is a symbolic-link loop"
    elif where == "data dir is a file":
        flags = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "train" / "n0000" / "img0.png")]
        path = tmp_path / "train" / "n0000" / "img0.png"
        expected = f"image folder {path / 'train'}: {path} is not a folder"
    elif where.startswith("split file") or where in ("listed image", "index file"):
        flags = _split_files(tmp_path)
        if where == "split file":
            (tmp_path / "LT_train.txt").unlink()
            _loop(tmp_path / "LT_train.txt")
            expected = f"split file {tmp_path / 'LT_train.txt'}: it is a symbolic-link loop"
        elif where == "split file folder":
            _loop(tmp_path / "lists")
            flags[-1] = str(tmp_path / "lists" / "LT_train.txt")
            expected = f"split file {flags[-1]}: {tmp_path / 'lists'} is a symbolic-link loop"
        elif where == "split file is a folder":
            flags[-1] = str(tmp_path / "train")
            flags += ["--test-split-file", str(tmp_path / "LT_test.txt")]
            expected = f"split file {tmp_path / 'train'}: it is a folder, not a file"
        elif where == "listed image":
            _loop(tmp_path / "train" / "n0001" / "x.png")
            with open(tmp_path / "LT_train.txt", "a") as f:
                f.write("train/n0001/x.png 1\n")
            path = tmp_path / "train" / "n0001" / "x.png"
            expected = f"{tmp_path / 'LT_train.txt'}:6: 1 listed images not found under {tmp_path} (first: "
            expected += f"train/n0001/x.png): {path}: it is a symbolic-link loop"
        else:
            _loop(tmp_path / "idx.txt")
            flags += ["--index-file", str(tmp_path / "idx.txt")]
            expected = f"index file {tmp_path / 'idx.txt'}: it is a symbolic-link loop"
    elif where == "cifar folder":
        _loop(tmp_path / "cifar-10-batches-py")
        flags = ["--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-download"]
        path = tmp_path / "cifar-10-batches-py"
        expected = f"cifar10 file {path / 'data_batch_1'}: {path} is a symbolic-link loop"
    else:
        write_fashion_mnist(tmp_path, 2, 1, gz=False)
        (tmp_path / "t10k-labels-idx1-ubyte").unlink()
        _loop(tmp_path / "t10k-labels-idx1-ubyte")
        flags = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--no-download"]
        expected = f"cannot read {tmp_path / 't10k-labels-idx1-ubyte'}: it is a symbolic-link loop"
    message = _cli_error(tmp_path, *flags)
    assert message.startswith(expected), message
    assert "/loop/loop" not in message and "which is not there" not in message


def test_an_unreadable_list_file_is_one_line_naming_it(tmp_path):
    """A split or index file without read permission gave a PermissionError traceback."""
    if os.geteuid() == 0:
        pytest.skip("root reads anything")
    flags = _split_files(tmp_path)
    (tmp_path / "idx.txt").write_text("0 3\n")
    for path, extra, what in (
        (tmp_path / "LT_train.txt", [], "split file"),
        (tmp_path / "idx.txt", ["--index-file", str(tmp_path / "idx.txt")], "index file"),
    ):
        path.chmod(0)
        assert _cli_error(tmp_path, *flags, *extra) == f"cannot read {what} {path}: Permission denied"
        path.chmod(0o644)
