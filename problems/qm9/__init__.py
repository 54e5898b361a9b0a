"""QM9: the 11-target molecular property benchmark of the multi-task papers.

* :mod:`.reader` — the molecules and targets of the ``qm9pack`` package's CSV files;
* :mod:`.targets` — the 11 targets, their units and conversions (PyTorch Geometric's);
* :mod:`.featurize` — molecular graphs as PyG's QM9 defines them (RDKit);
* :mod:`.batching` — complete graphs with bond and distance features, many molecules per batch;
* :mod:`.model` — the MPNN encoder (edge network + GRU, Set2Set) and 11 linear heads;
* :mod:`.workload` — :class:`QM9`, the training workload (``mtl-opt train --workload qm9``).

Reading the data needs the ``qm9`` extra (``pip install 'mtl-opt[qm9]'``: qm9pack, RDKit).
"""
