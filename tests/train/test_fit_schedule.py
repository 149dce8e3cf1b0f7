"""`run.fit_schedule`: with a wall-clock budget, the lr schedule is shortened to the steps the
budget allows at the measured pace, so a slow machine ends a complete schedule; the fitted length
is recorded and kept by a resumed run."""

import json

import numpy as np
import pytest

from sr_jax.train import loop
from sr_jax.train.metrics import read_metrics
from sr_jax.train.optim import lr_schedule
from sr_jax.train.sft import train

from tests.train.test_sft import small


def test_fitted_total_arithmetic():
    # 11 steps done in 210 s of a 290 s budget at 20 s per step: 4 more fit.
    assert loop.fitted_total(40, 11, 210.0, 20.0, 290.0) == 15
    # The retrace of the step is paid from the same budget.
    assert loop.fitted_total(40, 11, 210.0, 20.0, 290.0, retrace_seconds=20.0) == 14
    assert loop.fitted_total(40, 11, 10.0, 1.0, 1000.0) == 40  # fast enough: the configured length stays
    assert loop.fitted_total(40, 11, 400.0, 20.0, 290.0) == 12  # over budget already: the next step ends it
    # The pace is timed over 10 steps, or more where those took under 5% of the budget.
    assert loop.fit_window(20.0, 140.0) == 10
    assert loop.fit_window(0.74, 1800.0) == 122
    assert loop.fit_window(0.0, 1800.0) == 10


class StepClock:
    """The loop reads its clock once at the start and twice per step: 10 s per read is 20 s per step."""

    def __init__(self):
        self.reads = 0

    def __call__(self):
        self.reads += 1
        return 10.0 * self.reads


def _learning_rates(out):
    return {r["step"]: r["learning_rate"] for r in read_metrics(out / "metrics.jsonl")}


def test_fit_schedule_ends_a_complete_schedule_within_the_budget(tmp_path, monkeypatch):
    """40 configured steps, 20 s each, a 140 s budget. The 2 steps after the first took under 40%
    of the budget, so the pace is timed over 3: fitted after step 4 to 7 steps. Steps 5-7 follow
    the 7-step cosine to its floor; a resumed call keeps the recorded length."""
    monkeypatch.setattr(loop, "FIT_AFTER_STEPS", 2)  # fewer steps to run than the default 10 ...
    monkeypatch.setattr(loop, "FIT_WINDOW_SHARE", 0.4)  # ... and a window that takes one more
    monkeypatch.setattr(loop, "_clock", StepClock())
    extra = {"run.total_steps": 40, "run.max_seconds": 140, "run.fit_schedule": "true", "run.checkpoint_every": 1,
             "train.optim.schedule": "cosine", "train.optim.warmup_ratio": 0.1, "train.optim.min_lr_ratio": 0.1}
    cfg = small(tmp_path, **extra)
    first = train(cfg, stop_after=5)
    assert first["step"] == 5 and first["total_steps"] == 7 and first["configured_steps"] == 40
    record = json.loads((tmp_path / loop.SCHEDULE_FILE).read_text())
    assert record["total_steps"] == 7 and record["configured_steps"] == 40 and record["fitted_at_step"] == 4
    assert record["seconds_per_step"] == pytest.approx(20.0)

    monkeypatch.setattr(loop, "_clock", StepClock())  # a fresh budget for the resumed call: no second fit
    second = train(small(tmp_path, **extra))
    assert second["resumed_from"] == 5 and second["step"] == 7 and second["total_steps"] == 7

    lrs = _learning_rates(tmp_path)
    assert sorted(lrs) == list(range(1, 8))
    before, after = lr_schedule(cfg.train.optim, 40), lr_schedule(cfg.train.optim, 7)
    # The update of loop step s uses the schedule at s - 1 (steps 1-4 ran before the fit).
    np.testing.assert_allclose([lrs[s] for s in range(1, 5)], [float(before(s - 1)) for s in range(1, 5)], rtol=1e-6)
    np.testing.assert_allclose([lrs[s] for s in range(5, 8)], [float(after(s - 1)) for s in range(5, 8)], rtol=1e-6)
    assert lrs[7] < lrs[6] < lrs[5] < float(before(4))  # the shorter cosine, well below the configured one
    assert float(after(7)) == pytest.approx(0.1 * cfg.train.optim.learning_rate)
    assert (tmp_path / "model").is_dir()


def test_fit_schedule_refuses_a_record_of_another_length(tmp_path):
    (tmp_path / loop.SCHEDULE_FILE).write_text(json.dumps({"total_steps": 3, "configured_steps": 99}))
    with pytest.raises(ValueError, match="fitted from 99 steps.*configured for 4"):
        train(small(tmp_path))
