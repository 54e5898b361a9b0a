"""Input checks at the library boundary: one clear error naming the problem."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

import torch
from torch import Tensor

from mtl_opt._gramian import (  # noqa: F401  (the Gramian's home; names kept importable here)
    GRAMIAN_BLOCK,
    GRAMIAN_WIDE,
    _diagonal_in_range,
    _gram,
    _needs_float64,
    check_finite_rows,
    gramian_of,
    underflow_threshold,
)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)


def check_jacobian(G: object) -> None:
    """Shape and dtype of a Jacobian ``G`` (K, d); cheap (no pass over the data, no host sync)."""
    if not isinstance(G, Tensor):
        raise TypeError(f"the Jacobian must be a torch.Tensor of shape (K, d), got {type(G).__name__}")
    if G.dim() != 2:
        raise ValueError(
            f"the Jacobian must have shape (K, d) (one row per task), got shape {tuple(G.shape)}"
        )
    if G.shape[0] == 0:
        raise ValueError("the Jacobian has K = 0 rows: there is no task to aggregate")
    if G.shape[1] == 0:
        raise ValueError("the Jacobian has d = 0 columns: there is no parameter to update")
    if G.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"the Jacobian must be a floating-point tensor, got dtype {G.dtype}")
    if G.device.type == "meta":
        raise ValueError(
            "the Jacobian is on the 'meta' device (a shape without values): materialise it on a "
            "real device (e.g. .to_empty(device='cpu') and fill it) before aggregating"
        )


def gramian_rtol(dtype: torch.dtype, d: int) -> float:
    """Relative precision of a Gramian of ``d`` columns formed from a ``dtype`` Jacobian, and
    of the direction formed from it: the zero-norm threshold of the K × K solves
    (:func:`mtl_opt.solvers.gramian_precision`), relative to ``max_i M_ii``.

    ``max(ZERO_NORM_RTOL, eps_gram·√d, eps_dtype)``:

    * ``eps_gram·√d`` is the Gramian's rounding, ``|ΔM_ij| ≲ eps·√d ‖g_i‖‖g_j‖`` (the product runs
      in float32 for float16/bfloat16/float32, in float64 for float64). Measured (K = 2, 4;
      d = 10 … 10⁷; random, positive and collinear rows): at most 0.8·eps·√d (the single
      product at d = 4·10⁶), ~0.001–0.2·eps·√d for the blocked one. A combination with
      ``wᵀMw`` below it is rounding noise, not a direction.
    * ``eps_dtype`` keeps the direction accurate: the conflict-averse direction divides a
      combination ``g_w`` (formed in the Jacobian's dtype, error ``~eps·max_i‖g_i‖``) by its
      norm ``r``; with ``r² > eps·max_i M_ii`` that error is at most ``√eps`` of the result
      (3.5e-4 in float32), and the weights at most ``~1/√eps`` (for float16/bfloat16 inputs it
      is also the rows' own precision).

    Measured alternative: forming float32 Gramians in float64 instead (blocked conversion,
    the fastest variant) costs 1.4–3× the float32 Gramian on the CPU (K = 2, d = 10⁶: 1.3 ms
    against 0.4 ms; K = 8, d = 10⁷: 110 against 50 ms), and still needs the ``eps_dtype`` term
    for the combination. A threshold costs nothing; its price is that, for float32 Jacobians,
    a conflict-averse optimum with ``‖g_w*‖ < √(eps·√d) · max_i‖g_i‖`` (0.6 % at d = 10⁵,
    2 % at d = 10⁷) takes the origin rule (the closest non-conflicting point to the mean).
    """
    eps = float(torch.finfo(dtype).eps)
    gram_eps = eps if dtype == torch.float64 else _F32_EPS
    return max(1e-14, gram_eps * math.sqrt(max(d, 1)), eps)


_F32_EPS = float(torch.finfo(torch.float32).eps)


def all_finite(t: Tensor) -> bool:
    """``torch.isfinite(t).all()`` for small CPU tensors, at a fraction of the overhead."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(t.detach().numpy()).all())
    return bool(torch.isfinite(t).all())


def check_gramian(M: object) -> Tensor:
    """A user-supplied Gramian: square, finite, symmetric, positive semidefinite; float64 CPU.

    A Gramian ``G Gᵀ`` has a non-negative diagonal and no negative eigenvalue; eigenvalues
    below ``-tol·scale`` (``scale = max |M_ij|``, ``tol = max(1e-8, 16·eps(M.dtype))`` so that
    float32 Gramians of rank-deficient Jacobians pass) are rejected.
    """
    if not isinstance(M, Tensor):
        raise TypeError(f"the Gramian must be a torch.Tensor of shape (K, K), got {type(M).__name__}")
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"the Gramian must be square (K, K), got shape {tuple(M.shape)}")
    if M.shape[0] == 0:
        raise ValueError("the Gramian has K = 0 rows: there is no task to aggregate")
    return check_gramian_batch(M[None], single=True)[0]


def check_gramian_batch(M: object, *, single: bool = False) -> Tensor:
    """A batch of user-supplied Gramians (B, K, K): the checks of :func:`check_gramian` on
    every entry; returned as float64 CPU, exactly symmetric."""
    what = "the Gramian" if single else "the Gramians"
    if not isinstance(M, Tensor) or M.dim() != 3 or M.shape[1] != M.shape[2]:
        shape = tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__
        raise ValueError(f"a batch of Gramians must have shape (B, K, K), got {shape}")
    if M.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be floating-point, got dtype {M.dtype}")
    if M.device.type == "meta":
        raise ValueError(f"{what} is on the 'meta' device (a shape without values)")
    if M.shape[0] == 0 or M.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {tuple(M.shape)}): there is no task to aggregate")
    a = M.detach().to(device="cpu", dtype=torch.float64).numpy()
    where = (lambda b: "") if single else (lambda b: f" (batch entry {b})")
    finite = np.isfinite(a).all(axis=(1, 2))
    if not finite.all():
        raise ValueError(f"{what} is not finite (NaN or inf entries){where(int(np.argmin(finite)))}")
    scale = np.maximum(np.abs(a).max(axis=(1, 2)), 1e-300)
    asym = np.abs(a - a.transpose(0, 2, 1)).max(axis=(1, 2)) > 1e-6 * scale
    if asym.any():
        raise ValueError(f"{what} is not symmetric{where(int(np.argmax(asym)))}")
    sym = (a + a.transpose(0, 2, 1)) * 0.5
    diag = np.diagonal(sym, axis1=1, axis2=2)
    negative = (diag < 0).any(axis=1)
    if negative.any():
        b = int(np.argmax(negative))
        raise ValueError(
            f"{what} has a negative diagonal entry {float(diag[b].min())!r}{where(b)}: squared "
            "norms cannot be negative (a Gramian is G Gᵀ)"
        )
    tol = max(1e-8, 16.0 * float(torch.finfo(M.dtype).eps))
    lowest = np.linalg.eigvalsh(sym)[:, 0]
    not_psd = lowest < -tol * scale
    if not_psd.any():
        b = int(np.argmax(not_psd))
        raise ValueError(
            f"{what} is not positive semidefinite: eigenvalue {float(lowest[b])!r}{where(b)} "
            f"(a Gramian G Gᵀ has none below 0; tolerance {tol:g} of the largest entry)"
        )
    return torch.from_numpy(sym)


def check_task_vector(values: object, n_tasks: int | None, name: str) -> Tensor:
    """A length-K vector of finite numbers (losses, task weights), returned as float64 CPU.

    ``n_tasks=None`` accepts any non-empty length (a method's weights before it sees a
    Jacobian). A string is refused (``"10"`` is not the vector ``[1, 0]``), and so is every
    entry that is not a real number (strings, booleans, nested lists)."""
    count = "" if n_tasks is None else f"{n_tasks} "
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a list of {count}numbers such as [1, 4], got the string {values!r}")
    if isinstance(values, Tensor):
        if values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got a {values.dtype} tensor")
        t = values.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    elif isinstance(values, Sequence) or hasattr(values, "__array__"):
        try:
            items = list(values)  # type: ignore[call-overload]
        except TypeError:
            raise TypeError(f"{name} must be a list of {count}numbers, got {values!r}") from None
        bad = [v for v in items if isinstance(v, (str, bytes, bool)) or getattr(getattr(v, "dtype", None), "kind", "f") in "USbO"]
        if bad:
            raise TypeError(f"{name} must be a list of {count}numbers, got {values!r} (entry {bad[0]!r})")
        try:
            t = torch.as_tensor(
                [float(v.detach()) if isinstance(v, Tensor) else float(v) for v in items],
                dtype=torch.float64,
            )
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a sequence of {count}numbers: {exc}") from None
    else:
        raise TypeError(f"{name} must be a tensor or a sequence of {count}numbers, got {type(values).__name__} {values!r}")
    if n_tasks is None:
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty")
    elif t.numel() != n_tasks:
        raise ValueError(f"{name} has {t.numel()} entries but there are {n_tasks} tasks")
    # K numbers: checked in Python (a fraction of a NumPy/torch reduction's overhead).
    if not (all(map(math.isfinite, t.tolist())) if t.numel() <= 8 else all_finite(t)):
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    return t


def check_range(name: str, value: object, *, low: float | None = None, high: float | None = None,
                low_inclusive: bool = True, high_inclusive: bool = True, owner: str = "") -> float:
    """A real hyperparameter within bounds; returns it as float."""
    where = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}{name} must be a real number, got {value!r}")
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{where}{name} must be finite, got {value!r}")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"{where}{name} must be {op} {low}, got {value!r}")
    if high is not None and (v > high or (v == high and not high_inclusive)):
        op = "<=" if high_inclusive else "<"
        raise ValueError(f"{where}{name} must be {op} {high}, got {value!r}")
    return v


def check_choice(name: str, value: object, choices: Sequence[str], owner: str = "") -> str:
    where = f"{owner}: " if owner else ""
    if value not in choices:
        raise ValueError(f"{where}{name} must be one of {list(choices)}, got {value!r}")
    return str(value)


# --------------------------------------------------------------------------------------------
# What reaches the weights: directions and gradients
# --------------------------------------------------------------------------------------------
def check_direction(
    direction: Tensor | Sequence[Tensor],
    method: object,
    *,
    beta: Tensor | None = None,
    gramian: Tensor | None = None,
    G: Tensor | None = None,
    unbounded: Sequence[Tensor] = (),
) -> None:
    """The one check of an aggregated direction before it can reach the weights.

    Every path that turns a Jacobian into an update calls it: ``aggregate`` (single calls),
    ``aggregate_batch``, :func:`mtl_opt.aggregate_many` and :func:`mtl_opt.mtl_backward`'s
    blocked and factored paths. A finite Jacobian can still give an infinite or NaN direction
    (``βᵀG`` overflows the dtype, e.g. float32 beyond 3.4e38, or ``inf − inf``); this raises
    ``ValueError`` naming the method (``repr(method)``, with its hyperparameters) instead.

    Cost: for a Gramian weighting (``direction = βᵀG`` with ``beta`` and ``gramian = G Gᵀ``
    given, and ``G`` known finite because ``gramian`` is) nothing is read from the direction:
    every entry and every partial sum of ``Σ_i β_i g_ik`` is bounded by
    ``Σ_i |β_i| ‖g_i‖`` (K numbers from the Gramian's diagonal), so when that bound and every
    ``|β_i|`` are below half the dtype's largest number the direction is finite by
    construction. Otherwise (and for the ``unbounded`` pieces, computed some other way) one
    sum per piece screens it (one host sync; a NaN or infinity anywhere makes the sum
    non-finite), and only a non-finite sum (which large finite entries can also reach) pays
    for the element-wise test.

    Args:
        direction: the direction (d,), a batch of them (B, d), or its pieces (one per
            parameter).
        method: the aggregator, named in the error.
        beta, gramian: the weights and the float64 Gramian when ``direction = βᵀG``.
        G: the Jacobian (K, d) or (B, K, d), to name its non-finite rows when the direction
            is not finite because of them (methods that do not check ``G`` beforehand).
        unbounded: pieces of ``direction`` that the bound does not cover (always screened).
    """
    pieces = [direction] if isinstance(direction, Tensor) else list(direction)
    if not pieces:
        return
    dtype = pieces[0].dtype
    bound = _combination_bound(beta, gramian)
    if bound is not None and bound <= 0.5 * float(torch.finfo(dtype).max):
        screened = list(unbounded)
    else:
        screened = pieces
    if not screened or not _non_finite(screened):
        return
    if G is not None:
        _raise_non_finite_jacobian(G)
    name = str(dtype).replace("torch.", "")
    reach = "it is not finite" if bound is None else f"its entries can reach {bound:.3g}"
    raise ValueError(
        f"{method!r}: the aggregated direction overflows {name}; rescale the losses (or the "
        f"method's scale hyperparameters) so that the update fits: {reach} although the "
        f"Jacobian is finite, and the largest {name} is {float(torch.finfo(dtype).max):.3g}"
    )


def _combination_bound(beta: Tensor | None, gramian: Tensor | None) -> float | None:
    """``max(Σ_i |β_i| √M_ii, max_i |β_i|)``, or ``None`` when it is unknown or not finite."""
    if beta is None or gramian is None or beta.dim() != 1 or gramian.shape != (beta.numel(),) * 2:
        return None
    b = beta.tolist()
    diag = gramian.diagonal().tolist()
    total = sum(abs(x) * math.sqrt(max(m, 0.0)) for x, m in zip(b, diag))
    bound = max(total, max(abs(x) for x in b))
    return bound if math.isfinite(bound) else None


def _non_finite(pieces: Sequence[Tensor]) -> list[int]:
    """Indices of the pieces that hold a NaN or an infinity: one sum per piece and one host
    sync per device; the element-wise test runs only for pieces whose sum is not finite."""
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(pieces):
        by_device.setdefault(p.device, []).append(i)
    suspects = []
    for indices in by_device.values():
        sums = torch.stack([
            pieces[i].detach().sum(dtype=torch.float32 if pieces[i].dtype in _HALF else None)
            .to(torch.float64)
            for i in indices
        ])
        suspects += [i for i, ok in zip(indices, torch.isfinite(sums).tolist()) if not ok]
    return [i for i in sorted(suspects) if not bool(torch.isfinite(pieces[i]).all())]


def _raise_non_finite_jacobian(G: Tensor) -> None:
    """Raise naming the task rows of ``G`` (K, d), or the (batch, task) entries of ``G``
    (B, K, d), that hold NaN or inf; return if ``G`` is finite."""
    if G.dim() == 2:
        check_finite_rows(G)
        return
    bad = torch.nonzero(~torch.isfinite(G).all(dim=-1)).tolist()
    if bad:
        raise ValueError(
            f"the Jacobians are not finite: (batch, task) entries {bad[:10]} contain NaN or inf"
        )


def check_gradients(named: Sequence[tuple[str, Tensor]]) -> None:
    """Every gradient a step is about to write is finite; else ``ValueError`` naming it.

    ``named`` holds ``(description, gradient)`` pairs, the description naming the parameter
    and where its gradient came from (which task's loss). One sum per gradient and one host
    sync for all of them (see :func:`check_direction`).
    """
    if not named:
        return
    bad = _non_finite([g for _, g in named])
    if bad:
        names = [named[i][0] for i in bad]
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        raise ValueError(
            f"the gradient of {names[0]}{more} is not finite (NaN or inf) although the losses "
            "are: nothing was written. Look for an operation whose derivative is infinite at "
            "the current values (sqrt or log at 0, division by zero) or rescale the losses"
        )
