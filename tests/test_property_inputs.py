"""Property-based tests: malformed and extreme inputs give a finite direction or one named error.

Every registered method (``mtl_opt.available_aggregators()``, so a new method is covered as soon
as it registers) is thrown random Jacobians — NaN and inf rows, huge and tiny magnitudes in
float16, bfloat16, float32 and float64, zero rows, duplicated rows, K = 1 — and malformed
arguments (wrong shapes, integer dtypes, non-tensors), through ``__call__``, ``aggregate_batch``
and :func:`mtl_opt.aggregate_many`, and :func:`mtl_opt.mtl_backward` gets the same Jacobians as
the gradients of linear losses. Each call must either return a finite direction of the right
shape and dtype or raise ``ValueError``/``TypeError`` with a message; anything else (a NaN, a
``RuntimeError`` from inside a solver, an ``IndexError``) fails.

Deterministic (``derandomize=True``: the examples are a fixed function of the test) and small
enough to run in well under a minute.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mtl_opt
from mtl_opt import aggregate_many, get_aggregator, mtl_backward

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
METHODS = mtl_opt.available_aggregators()
SETTINGS = settings(
    max_examples=60, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Magnitudes that stress each dtype's range: subnormal/underflowing, ordinary, and near or
# beyond the largest float16/float32/float64 numbers.
MAGNITUDES = [0.0, 1e-300, 1e-40, 1e-20, 1e-8, 1e-3, 1.0, 3.0, 1e4, 3e4, 1e19, 1e30, 1.5e38, 1e300]
SPECIAL_ROWS = ["plain", "nan", "inf", "-inf", "zero", "duplicate", "negated"]

# Finite rows whose sum overflows the dtype (float32 beyond 3.4e38, float16 beyond 65504): always
# tried, whatever the random draws.
OVERFLOWING = [torch.full((2, 3), 2e38), torch.full((3, 2), 3e4, dtype=torch.float16),
               torch.full((2, 3), 2e38, dtype=torch.bfloat16)]


def _method(name: str) -> mtl_opt.GradientAggregator:
    return get_aggregator(name, seed=0) if name == "pcgrad" else get_aggregator(name)


@st.composite
def jacobians(draw, max_k: int = 4, max_d: int = 6) -> torch.Tensor:
    """A (K, d) Jacobian: rows of random signs and magnitudes, some rows replaced by NaN, inf,
    zeros or copies of another row, in one of the four float dtypes."""
    K = draw(st.integers(1, max_k))
    d = draw(st.integers(1, max_d))
    dtype = draw(st.sampled_from(DTYPES))
    rows = []
    for _ in range(K):
        scale = draw(st.sampled_from(MAGNITUDES))
        values = draw(st.lists(st.floats(-2.0, 2.0, allow_nan=False), min_size=d, max_size=d))
        row = [v * scale for v in values]
        kind = draw(st.sampled_from(SPECIAL_ROWS))
        if kind in ("nan", "inf", "-inf"):
            row[draw(st.integers(0, d - 1))] = float(kind)
        elif kind == "zero":
            row = [0.0] * d
        elif kind in ("duplicate", "negated") and rows:
            sign = 1.0 if kind == "duplicate" else -0.7
            row = [sign * v for v in rows[draw(st.integers(0, len(rows) - 1))]]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).to(dtype)


def _assert_direction(out: object, shape: tuple[int, ...], dtype: torch.dtype, where: str) -> None:
    assert isinstance(out, torch.Tensor), f"{where}: returned {type(out).__name__}"
    assert tuple(out.shape) == shape, f"{where}: shape {tuple(out.shape)}, expected {shape}"
    assert out.dtype == dtype, f"{where}: dtype {out.dtype}, expected {dtype}"
    assert bool(torch.isfinite(out).all()), f"{where}: non-finite direction {out.tolist()}"


def _named_error(exc: BaseException, where: str) -> None:
    """The only acceptable failure: ValueError or TypeError with a message."""
    if not isinstance(exc, (ValueError, TypeError)):
        raise AssertionError(f"{where}: {type(exc).__name__} instead of a named error: {exc}") from exc
    assert str(exc).strip(), f"{where}: {type(exc).__name__} without a message"


@pytest.mark.parametrize("name", METHODS)
@SETTINGS
@given(G=jacobians())
@example(G=OVERFLOWING[0])
@example(G=OVERFLOWING[1])
@example(G=OVERFLOWING[2])
def test_call_gives_a_finite_direction_or_a_named_error(name, G):
    where = f"{name}({G.dtype}, {tuple(G.shape)})"
    try:
        out = _method(name)(G)
    except Exception as exc:  # noqa: BLE001 - classified by _named_error
        _named_error(exc, where)
        return
    _assert_direction(out, (G.shape[1],), G.dtype, where)


@pytest.mark.parametrize("name", METHODS)
@SETTINGS
@given(G=jacobians(max_k=3, max_d=4), B=st.integers(1, 3), data=st.data())
@example(G=OVERFLOWING[0], B=1, data=None)
def test_aggregate_batch_gives_finite_directions_or_a_named_error(name, G, B, data):
    # Batch entries: the drawn Jacobian and rescaled copies (same dtype and shape).
    scales = [1.0] * B if data is None else data.draw(
        st.lists(st.sampled_from([1.0, 0.0, -1.0, 1e-30, 1e30]), min_size=B, max_size=B)
    )
    batch = torch.stack([G * s for s in scales])
    where = f"{name}.aggregate_batch({G.dtype}, {tuple(batch.shape)})"
    try:
        out = _method(name).aggregate_batch(batch)
    except Exception as exc:  # noqa: BLE001
        _named_error(exc, where)
        return
    _assert_direction(out, (B, G.shape[1]), G.dtype, where)


@SETTINGS
@given(G=jacobians())
@example(G=OVERFLOWING[0])
@example(G=OVERFLOWING[1])
def test_aggregate_many_gives_finite_directions_or_a_named_error(G):
    where = f"aggregate_many({G.dtype}, {tuple(G.shape)})"
    try:
        out = aggregate_many(G, {name: _method(name) for name in METHODS})
    except Exception as exc:  # noqa: BLE001
        _named_error(exc, where)
        return
    assert list(out) == METHODS
    for name, direction in out.items():
        _assert_direction(direction, (G.shape[1],), G.dtype, f"{where}[{name}]")


MALFORMED = [
    None, "G", 3.0, [[1.0, 2.0], [3.0, 4.0]], torch.ones(3), torch.ones(2, 3, 4),
    torch.ones(0, 3), torch.ones(2, 0), torch.ones(2, 3, dtype=torch.int64),
    torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3, dtype=torch.complex64),
    torch.ones(2, 3, device="meta"),
]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("bad", MALFORMED, ids=lambda b: type(b).__name__ if not isinstance(
    b, torch.Tensor) else f"{b.dtype}{tuple(b.shape)}{b.device.type}")
def test_malformed_jacobians_give_one_named_error(name, bad):
    # aggregate_batch takes (B, K, d): the same defects one dimension up (a valid (B, K, d)
    # float tensor becomes a 4-D one).
    batched = bad[None] if isinstance(bad, torch.Tensor) else bad
    for call in (lambda: _method(name)(bad), lambda: _method(name).aggregate_batch(batched),
                 lambda: aggregate_many(bad, [_method(name)])):
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert str(info.value).strip()


@pytest.mark.parametrize("name", METHODS)
@SETTINGS
@given(G=jacobians(max_k=3, max_d=5), parallel=st.sampled_from(["auto", False]))
@example(G=OVERFLOWING[0], parallel="auto")
@example(G=OVERFLOWING[0], parallel=False)
def test_mtl_backward_writes_finite_gradients_or_raises_a_named_error(name, G, parallel):
    """Linear losses ``L_i = G_i · θ`` at ``θ = 0`` (finite values unless ``G`` has NaN/inf)
    have the Jacobian ``G``; a head parameter ``h`` adds ``h · L_i`` terms (its gradient ``Σ L_i``
    is then the losses, 0). Either every gradient written is finite, of the parameter's shape
    and dtype, or nothing is written and a named error is raised."""
    theta = torch.zeros(G.shape[1], dtype=G.dtype, requires_grad=True)
    head = torch.zeros((), dtype=G.dtype, requires_grad=True)
    losses = [(G[i] * theta).sum() * (1 + head) for i in range(G.shape[0])]
    where = f"mtl_backward({name}, {G.dtype}, {tuple(G.shape)}, parallel={parallel})"
    try:
        mtl_backward(losses, [theta], _method(name), parallel=parallel)
    except Exception as exc:  # noqa: BLE001
        _named_error(exc, where)
        assert theta.grad is None and head.grad is None, f"{where}: wrote before raising"
        return
    _assert_direction(theta.grad, tuple(theta.shape), theta.dtype, where)
    _assert_direction(head.grad, (), head.dtype, where)


def test_the_property_tests_cover_every_registered_method():
    assert METHODS == mtl_opt.available_aggregators() and len(METHODS) >= 6
