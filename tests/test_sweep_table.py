"""The sweep's results table: status column, retried steps deduplicated, best trial."""

import pytest

from mtl_opt.experiments.sweep_table import TrialRecord, best_trial, build_tables, last_attempt


def _rows(steps, values, completed_last=False):
    rows = [{"training_iteration": i + 1, "step": s, "loss_mean": v, "completed": False}
            for i, (s, v) in enumerate(zip(steps, values))]
    if completed_last:
        rows.append({**rows[-1], "training_iteration": len(rows) + 1, "completed": True})
    return rows


def test_last_attempt_keeps_only_the_final_attempt_one_row_per_step():
    first = _rows([0, 10, 20], [5.0, 4.0, 3.0])          # failed after step 20
    second = _rows([0, 10], [5.0, 4.5])                    # failed again after step 10
    third = _rows([0, 10, 20, 30], [5.0, 4.2, 3.1, 2.0], completed_last=True)
    rows, attempts = last_attempt(first + second + third)
    assert attempts == 3
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    assert [r["loss_mean"] for r in rows] == [5.0, 4.2, 3.1, 2.0]
    assert rows[-1]["completed"] is True  # the repeated last step keeps its last report


def test_tables_have_status_attempts_errors_and_no_repeated_steps():
    records = [
        TrialRecord("t0", {"kappa": 1.0, "nu": 0.0}, _rows([0, 10, 20], [3.0, 2.0, 1.0], True)),
        TrialRecord("t1", {"kappa": 2.0, "nu": 0.0},
                    _rows([0, 10], [3.0, 2.5]) + _rows([0, 10], [3.0, 2.6]),
                    error="RuntimeError: boom", failures=2),
        TrialRecord("t2", {"kappa": 1.0, "nu": 0.5}, _rows([0, 10], [3.0, 2.9])),  # stopped by ASHA
        TrialRecord("t3", {"kappa": 2.0, "nu": 0.5},
                    _rows([0, 10, 20], [9.0, 9.0, 9.0]) + _rows([0, 10, 20], [3.0, 0.5, 0.7], True),
                    failures=1),
    ]
    trials, curves = build_tables(records, searched=["kappa", "nu"], metric="loss_mean", mode="min",
                                  steps=20)
    assert list(trials["status"]) == ["COMPLETED", "ERROR", "STOPPED", "COMPLETED"]
    assert list(trials["attempts"]) == [1, 2, 1, 2]
    assert trials.loc[1, "error"] == "RuntimeError: boom"
    assert list(trials["steps_done"]) == [20, 10, 10, 20]
    assert trials.loc[3, "loss_mean"] == 0.7 and trials.loc[3, "loss_mean_best"] == 0.5
    assert trials.loc[1, "loss_mean"] == 2.6  # the last attempt's value
    assert not curves.duplicated(["trial_id", "step"]).any()
    assert len(curves) == 3 + 2 + 2 + 3
    assert "training_iteration" not in trials.columns and "completed" not in curves.columns

    best = best_trial(trials, metric="loss_mean", mode="min")
    assert best["trial_id"] == "t3"
    assert best_trial(trials, metric="loss_mean", mode="max")["trial_id"] == "t0"


def test_errored_trials_never_win_and_stopped_trials_count_only_without_completed_ones():
    records = [
        TrialRecord("a", {"x": 1}, _rows([0, 10], [1.0, 0.1]), error="ValueError: x"),
        TrialRecord("b", {"x": 2}, _rows([0, 5], [1.0, 0.5])),
    ]
    trials, _ = build_tables(records, searched=["x"], metric="loss_mean", mode="min", steps=10)
    assert best_trial(trials, metric="loss_mean", mode="min")["trial_id"] == "b"
    only_errors, _ = build_tables(records[:1], searched=["x"], metric="loss_mean", mode="min")
    assert best_trial(only_errors, metric="loss_mean", mode="min") is None


def test_a_trial_reaching_the_last_step_counts_as_completed():
    # A scheduler may stop a trial at max_t, before the trial's own final report.
    rec = TrialRecord("a", {"x": 1}, _rows([0, 10], [1.0, 0.1]))
    trials, _ = build_tables([rec], searched=["x"], metric="loss_mean", mode="min", steps=10)
    assert trials.loc[0, "status"] == "COMPLETED"


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        build_tables([], searched=[], metric="m", mode="best")
