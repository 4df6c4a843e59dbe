"""lt_data: long-tail counts, twins, shot groups, the real on-disk formats, synthetic data, samplers, CLI."""

from __future__ import annotations

import dataclasses
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
