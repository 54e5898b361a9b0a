"""The QM9 workload on a fixture of 13 molecules copied verbatim from qm9pack's CSV files
(tests/data/qm9/qm9_part1.csv: QM9 molecules 1-7, 50, 214, 215, 271, 486; qm9_part3.csv:
133857): target values and
units against documented molecules, featurisation of hand-checked molecules, batching, splits,
standardisation, one training step of every registered method, Δm% by hand."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("rdkit")
pytest.importorskip("pandas")

import mtl_opt
from mtl_opt.experiments.field_tables import delta_m
from mtl_opt.experiments.trainer import TrainConfig, prepare, train, train_steps
from mtl_opt.problems.qm9.batching import collate_molecules
from mtl_opt.problems.qm9.featurize import molecule_graph
from mtl_opt.problems.qm9.reader import read_qm9
from mtl_opt.problems.qm9.targets import HARTREE_TO_EV, QM9_TARGETS, TARGET_NAMES
from mtl_opt.problems.qm9.workload import QM9, qm9_split_indices
from mtl_opt.problems.workload import get_training_workload

FIXTURE = Path(__file__).parent / "data" / "qm9"
TINY = f"qm9:data_dir={FIXTURE},width=4"


@pytest.fixture(scope="module")
def records():
    return read_qm9(FIXTURE)


def _graph(records, number: int):
    i = int(np.nonzero(records.index == number)[0][0])
    return molecule_graph(records.smiles[i], records.elements[i], records.positions(i),
                          where=records.where(i)), i


# ---- targets and units ---------------------------------------------------------------------------
def test_the_targets_are_the_papers_eleven_in_their_order():
    assert TARGET_NAMES == ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "cv")
    assert [t.pyg_index for t in QM9_TARGETS] == [0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]


def test_methane_has_pytorch_geometrics_documented_target_values(records):
    """Methane (QM9 molecule 1), PyG's ``QM9()[0].y`` at the benchmark's indices: μ 0 D,
    α 13.21 a0³, HOMO −0.3877 Ha = −10.5499 eV, LUMO 0.1171 Ha = 3.1865 eV, ⟨R²⟩ 35.3641 a0²,
    ZPVE 0.044749 Ha = 1.2177 eV, atomization U0/U/H/G −17.1722/−17.2868/−17.3897/−16.1519 eV,
    c_v 6.469 cal/(mol K)."""
    assert records.index[0] == 1 and records.smiles[0] == "C"
    pyg = [0.0, 13.21, -10.5499, 3.1865, 35.3641, 1.2177, -17.1722, -17.2868, -17.3897, -16.1519, 6.469]
    np.testing.assert_allclose(records.targets[0], pyg, atol=6e-4)
    assert records.targets[0][2] == pytest.approx(-0.3877 * 27.211386246)


def test_water_atomization_energy_by_hand(records):
    """Water (molecule 3): U0 = −76.404702 Ha; free atoms O −75.064579, H −0.500273 Ha:
    (−76.404702 + 75.064579 + 2 × 0.500273) Ha = −0.339577 Ha = −9.24034 eV."""
    assert records.smiles[2] == "O"
    assert records.targets[2][TARGET_NAMES.index("U0")] == pytest.approx(-0.339577 * HARTREE_TO_EV, abs=1e-6)
    assert records.targets[2][TARGET_NAMES.index("U0")] == pytest.approx(-9.24034, abs=1e-4)
    assert records.targets[2][TARGET_NAMES.index("mu")] == pytest.approx(1.8511)


# ---- featurisation --------------------------------------------------------------------------------
def test_methane_graph(records):
    g, i = _graph(records, 1)
    assert g.num_atoms == 5 and g.num_bonds == 4
    carbon = [0, 1, 0, 0, 0, 6, 0, 0, 0, 1, 4]  # one-hot C, Z=6, not aromatic, sp3, 4 H neighbours
    hydrogen = [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert g.x.tolist() == [carbon] + [hydrogen] * 4
    assert g.bond_index.tolist() == [[0, 0, 0, 0, 1, 2, 3, 4], [1, 2, 3, 4, 0, 0, 0, 0]]
    assert g.bond_type.tolist() == [0] * 8  # single
    np.testing.assert_allclose(g.pos.numpy(), records.positions(i), atol=1e-6)


def test_water_graph(records):
    g, _ = _graph(records, 3)
    assert g.num_atoms == 3 and g.num_bonds == 2
    assert g.x[0].tolist() == [0, 0, 0, 1, 0, 8, 0, 0, 0, 1, 2]  # O, sp3, two H neighbours


def test_benzene_and_pyridine_are_aromatic(records):
    benzene, _ = _graph(records, 214)
    assert benzene.num_atoms == 12 and benzene.num_bonds == 12
    assert benzene.bond_type.bincount(minlength=4).tolist() == [12, 0, 0, 12]  # 6 C-H, 6 aromatic C-C
    carbons = benzene.x[:, 1] == 1
    assert int(carbons.sum()) == 6
    assert benzene.x[carbons][:, 6:].tolist() == [[1, 0, 1, 0, 1]] * 6  # aromatic, sp2, one H
    pyridine, _ = _graph(records, 215)
    nitrogen = pyridine.x[pyridine.x[:, 2] == 1][0]
    assert nitrogen.tolist() == [0, 0, 1, 0, 0, 7, 1, 0, 1, 0, 0]


def test_every_fixture_bond_joins_atoms_closer_than_1_7_angstrom(records):
    for number in records.index:
        g, _ = _graph(records, int(number))
        src, dst = g.bond_index
        assert float((g.pos[src] - g.pos[dst]).norm(dim=1).max()) < 1.7, number


@pytest.mark.parametrize("number, short, long", [(486, 2, 0), (271, 1, 0)])
def test_bonds_land_on_the_geometry_when_the_xyz_order_differs(records, number, short, long):
    """N#CC#CC#N lists its atoms C,C,C,C,N,N in the XYZ block, the SMILES N,C,C,C,C,N; the
    zwitterion lists an H before its O atoms. Multiple bonds land on the shorter distances."""
    g, _ = _graph(records, number)
    assert g.x[:, 0].tolist() != sorted(g.x[:, 0].tolist()) or number == 486
    src, dst = g.bond_index
    length = (g.pos[src] - g.pos[dst]).norm(dim=1)
    heavy = (g.x[src, 0] == 0) & (g.x[dst, 0] == 0)
    assert float(length[heavy & (g.bond_type == short)].max()) < float(length[heavy & (g.bond_type == long)].min())


def test_a_geometry_without_its_smiles_bonds_gets_the_geometrys_bonds(records):
    """QM9 molecule 133857 (SMILES CC1C2C3C4=CCC13C24) relaxed into another cage: its SMILES
    graph is not among the geometry's contacts, so its bonds are perceived from the geometry."""
    g, i = _graph(records, 133857)
    assert records.sources[i] == "qm9_part3.csv"
    assert g.bonds_from_geometry
    assert g.num_bonds == 22 and g.bond_type.bincount(minlength=4).tolist() == [42, 2, 0, 0]
    src, dst = g.bond_index
    assert float((g.pos[src] - g.pos[dst]).norm(dim=1).max()) < 1.6
    others = [_graph(records, int(n))[0] for n in records.index if n != 133857]
    assert not any(o.bonds_from_geometry for o in others)
    info = QM9(data_dir=FIXTURE, split_seed=0).data(0).info
    assert info["bonds_from_geometry"] == [133857]


def test_a_smiles_that_does_not_fit_its_geometry_is_named(records):
    with pytest.raises(ValueError, match=r"molecule 7.*CO"):
        molecule_graph("CO", records.elements[6], records.positions(6), where="qm9_part1.csv, molecule 7")


def test_a_batch_is_complete_graphs_with_bond_and_distance_features(records):
    methane, _ = _graph(records, 1)
    water, _ = _graph(records, 3)
    batch = collate_molecules([methane, water], torch.zeros(2, 11))
    assert batch.batch.tolist() == [0] * 5 + [1] * 3
    assert batch.edge_index.shape == (2, 5 * 4 + 3 * 2)
    src, dst = batch.edge_index
    assert bool((batch.batch[src] == batch.batch[dst]).all()) and bool((src != dst).all())
    bonded = batch.edge_attr[:, :4].sum(1)
    assert int(bonded.sum()) == 2 * 4 + 2 * 2  # methane's and water's bonds, both directions
    assert bonded[(src == 1) & (dst == 2)].item() == 0  # H–H in methane: no bond
    assert bonded[(src == 5) & (dst == 6)].item() == 1  # O–H in water
    pos = torch.cat([methane.pos, water.pos])
    torch.testing.assert_close(batch.edge_attr[:, 4], (pos[src] - pos[dst]).norm(dim=1))


# ---- splits and standardisation -------------------------------------------------------------------
def test_the_papers_split_sizes_and_their_subset_proportions():
    full = qm9_split_indices(130_831, 0, None)
    assert {k: len(v) for k, v in full.items()} == {"test": 10_000, "val": 10_000, "train": 110_831}
    sub = qm9_split_indices(130_831, 0, 10_000)
    assert {k: len(v) for k, v in sub.items()} == {"test": 764, "val": 764, "train": 8_472}
    assert np.array_equal(np.sort(np.concatenate(list(full.values()))), np.arange(130_831))


def test_splits_are_determined_by_the_seed():
    a, b, c = (qm9_split_indices(1000, s, None) for s in (3, 3, 4))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


def test_targets_are_standardised_with_the_training_splits_statistics(records):
    data = QM9(data_dir=FIXTURE, split_seed=0).data(0)
    train_rows = [int(np.nonzero(records.index == n)[0][0]) for n in data.info["molecules"]["train"]]
    assert data.sizes() == {"train": 11, "val": 1, "test": 1}
    y = data.train.y.double()
    torch.testing.assert_close(y.mean(0), torch.zeros(11, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(y.std(0), torch.ones(11, dtype=torch.float64), atol=1e-6, rtol=0)
    mean, std = np.array(data.info["target_mean"]), np.array(data.info["target_std"])
    expected = (records.targets[train_rows[0]] - mean) / std
    np.testing.assert_allclose(data.train.y[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data.info["metric_scale"],
                               std * [t.report_scale for t in QM9_TARGETS])


def test_the_mae_is_reported_in_the_targets_units(records):
    """A model off by exactly one standard deviation on every target reports MAE = std (in meV for
    the energies)."""
    workload = QM9(data_dir=FIXTURE, width=4, split_seed=0)
    data = workload.data(0)
    model = workload.build_model(data)

    class OffByOne(torch.nn.Module):
        target_scale = model.target_scale

        def forward(self, batch):
            return batch.y + 1.0, None

    batches = [data.collate([data.test[i] for i in range(len(data.test))])]
    metrics = workload.evaluate(OffByOne(), batches)
    std = np.array(data.info["target_std"])
    for k, t in enumerate(QM9_TARGETS):
        assert metrics[t.metric] == pytest.approx(std[k] * t.report_scale, rel=1e-6)
    assert metrics["mae_homo"] == pytest.approx(std[2] * 1000)  # eV → meV


def test_bad_files_and_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="holds no qm9_part"):
        read_qm9(tmp_path)
    (tmp_path / "qm9_part1.csv").write_text("Index,SMILES\n1,C\n")
    with pytest.raises(ValueError, match=r"qm9_part1\.csv: missing column"):
        read_qm9(tmp_path)
    lines = (FIXTURE / "qm9_part1.csv").read_text().splitlines()
    for bad, message in ((",0.,x,", "not numeric"), (",0.,,", "molecule 1: a property is missing")):
        assert ",0.,13.21," in lines[1]
        (tmp_path / "qm9_part1.csv").write_text("\n".join([lines[0], lines[1].replace(",0.,13.21,", bad)]) + "\n")
        with pytest.raises(ValueError, match=f"qm9_part1.csv.*{message}"):
            read_qm9(tmp_path)
    with pytest.raises(ValueError, match="subset"):
        get_training_workload("qm9", subset=0)
    with pytest.raises(ValueError, match="subset=50 exceeds the 13 molecules"):
        QM9(data_dir=FIXTURE, subset=50).data(0)


@pytest.mark.parametrize("package", ["qm9pack", "rdkit"])
def test_a_missing_extra_is_named_in_one_line(monkeypatch, capsys, tmp_path, package):
    """Without qm9pack (the data) or RDKit (the graphs) the error names the extra; it is an
    ImportError for library code and one line on the command line."""
    import builtins
    import sys

    from mtl_opt.cli import main
    from mtl_opt.problems.qm9 import workload as qm9_workload

    real_find, real_import = importlib.util.find_spec, builtins.__import__
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == package else real_find(name, *a))

    def no_rdkit(name, *args, **kwargs):
        if name == "rdkit" or name.startswith("rdkit."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    if package == "rdkit":
        monkeypatch.setattr(builtins, "__import__", no_rdkit)
        monkeypatch.setattr(qm9_workload, "_GRAPHS", {})
    spec = "qm9" if package == "qm9pack" else f"qm9:data_dir={FIXTURE}"
    with pytest.raises(ImportError, match=r"pip install 'mtl-opt\[qm9\]'"):
        QM9(**({} if package == "qm9pack" else {"data_dir": FIXTURE})).data(0)
    assert main(["train", "--workload", spec, "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'mtl-opt[qm9]'" in err[0], err


# ---- training through the one trainer ----------------------------------------------------------------
@pytest.mark.parametrize("method", mtl_opt.available_aggregators())
def test_every_registered_method_takes_a_finite_step_on_qm9(method):
    run = prepare(TrainConfig(workload=TINY, method=method, steps=1, batch_size=8, log_every=1))
    before = {k: v.clone() for k, v in run.model.encoder.state_dict().items()}
    rows = train_steps(run, 1)
    after = run.model.encoder.state_dict()
    assert all(torch.isfinite(v).all() for v in run.model.state_dict().values())
    assert any(not torch.equal(before[k], after[k]) for k in after), "the shared encoder did not move"
    assert all(rows[0][f"loss_{n}"] > 0 for n in TARGET_NAMES)


def test_a_run_reports_every_target_mae(tmp_path):
    result = train(TrainConfig(workload=TINY, method="nash_mtl", epochs=1, batch_size=4,
                               out=str(tmp_path / "run")))
    assert set(t.metric for t in QM9_TARGETS) <= set(result["test"])
    assert all(math.isfinite(result["test"][t.metric]) and result["test"][t.metric] > 0
               for t in QM9_TARGETS)


def test_delta_m_on_hand_computed_maes():
    """All 11 metrics lower-is-better: five at +50 %, six at −50 % → Δm% = (5·50 − 6·50)/11."""
    metrics = QM9.metrics
    assert not any(m.higher_is_better for m in metrics)
    base = {m.name: 2.0 for m in metrics}
    method = {m.name: (3.0 if k < 5 else 1.0) for k, m in enumerate(metrics)}
    assert delta_m(method, base, metrics) == pytest.approx(-50.0 / 11.0)


# ---- the model's layers against torch's and against a per-molecule computation -----------------------
def test_the_gru_and_lstm_steps_are_torchs_cells():
    from mtl_opt.problems.qm9.model import GRUStep, LSTMStep

    torch.manual_seed(0)
    gru, lstm = GRUStep(6), LSTMStep(12, 6)
    ref_gru, ref_lstm = torch.nn.GRUCell(6, 6), torch.nn.LSTMCell(12, 6)
    with torch.no_grad():
        for mine, ref in ((gru, ref_gru), (lstm, ref_lstm)):
            ref.weight_ih.copy_(mine.input_map.weight)
            ref.bias_ih.copy_(mine.input_map.bias)
            ref.weight_hh.copy_(mine.hidden_map.weight)
            ref.bias_hh.copy_(mine.hidden_map.bias)
    x, h, c, x2 = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 12)
    torch.testing.assert_close(gru(x, h), ref_gru(x, h))
    h_new, c_new = lstm(x2, h, c)
    ref_h, ref_c = ref_lstm(x2, (h, c))
    torch.testing.assert_close(h_new, ref_h)
    torch.testing.assert_close(c_new, ref_c)


def test_the_convolution_and_readout_match_their_equations_molecule_by_molecule(records):
    """NNConv: out_u = W_root h_u + mean_{v→u} h_v Θ(e_vu) + b; Set2Set's attention is a softmax
    within each molecule. Computed here with explicit loops."""
    from mtl_opt.problems.qm9.model import EdgeNetworkConv, Set2Set

    torch.manual_seed(1)
    graphs = [_graph(records, n)[0] for n in (1, 3, 214)]
    batch = collate_molecules(graphs, torch.zeros(3, 11))
    conv, readout = EdgeNetworkConv(4), Set2Set(4, steps=2)
    h = torch.randn(batch.x.shape[0], 4)
    theta = conv.edge_weights(batch.edge_attr)
    out = conv(h, batch.edge_index, theta)
    src, dst = batch.edge_index.tolist()
    for u in range(h.shape[0]):
        incoming = [e for e in range(len(dst)) if dst[e] == u]
        mean = sum(h[src[e]] @ theta[e] for e in incoming) / len(incoming)
        torch.testing.assert_close(out[u], conv.root(h[u]) + mean + conv.bias)
    pooled = readout(h, batch.batch, 3)
    for g in range(3):
        alone = readout(h[batch.batch == g], torch.zeros(int((batch.batch == g).sum()), dtype=torch.long), 1)
        torch.testing.assert_close(pooled[g], alone[0])


def test_a_molecule_gets_the_same_prediction_alone_and_in_a_batch(records):
    from mtl_opt.problems.qm9.model import QM9Model

    torch.manual_seed(2)
    model = QM9Model(width=6)
    graphs = [_graph(records, n)[0] for n in (1, 214, 271)]
    together, _ = model(collate_molecules(graphs, torch.zeros(3, 11)))
    for k, g in enumerate(graphs):
        alone, _ = model(collate_molecules([g], torch.zeros(1, 11)))
        torch.testing.assert_close(together[k], alone[0])


def test_the_per_task_jacobian_is_batched_through_every_layer(records):
    """mtl_backward takes one batched autograd call through the encoder (no fallback warning) and
    its Jacobian rows equal the per-task gradients."""
    import warnings

    from mtl_opt.problems.qm9.model import QM9Model

    torch.manual_seed(3)
    model = QM9Model(width=4)
    batch = collate_molecules([_graph(records, n)[0] for n in (1, 3, 214)], torch.randn(3, 11))

    def losses():
        prediction, _ = model(batch)
        return list(((prediction - batch.y) ** 2).mean(0).unbind())

    shared = model.shared_parameters()
    expected = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, shared, retain_graph=True)])
                for l in losses()]
    G = torch.stack(expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mtl_opt.mtl_backward(losses(), shared, mtl_opt.get_aggregator("mgda"), parallel=True)
    direction = torch.cat([p.grad.reshape(-1) for p in shared])
    reference = mtl_opt.get_aggregator("mgda")(G)
    torch.testing.assert_close(direction, reference, rtol=1e-4, atol=1e-6)
