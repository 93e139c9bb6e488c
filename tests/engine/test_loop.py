"""Resuming a run restores its LR scheduler's step count, which only means the same thing in
the schedule geometry it was counted in: another train.num_workers is refused, by the driver
before Ray starts (``train.check_run_dir``) and by the workers' restore
(``engine.restore_train_state``). No Ray: the pure functions are called directly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from cxr_ray.config import ExperimentConfig
from cxr_ray.engine.loop import EarlyStopping, make_scheduler, restore_train_state, schedule_geometry, train_state
from cxr_ray.errors import ConfigError
from cxr_ray.training.train import check_run_dir

N_TRAIN = 100
TRAIN = ExperimentConfig().replace(**{"train.batch_size": 10, "train.epochs": 10, "train.warmup_epochs": 1}).train


def _fresh(world_size: int):
    """Optimizer, scheduler and early stopping as a worker of ``world_size`` builds them."""
    geometry = schedule_geometry(N_TRAIN, TRAIN, world_size)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    return geometry, opt, make_scheduler(opt, geometry.warmup_steps, geometry.total_steps), EarlyStopping(3)


def _trained_state(world_size: int, epochs: int) -> dict:
    """The train state a ``world_size``-worker run saves after ``epochs`` epochs."""
    geometry, opt, sched, stopper = _fresh(world_size)
    for _ in range(epochs * geometry.steps_per_epoch):
        opt.step()
        sched.step()
    return train_state(opt, sched, stopper, epochs - 1, geometry)


def test_geometry_counts_steps_per_worker():
    one, two = schedule_geometry(N_TRAIN, TRAIN, 1), schedule_geometry(N_TRAIN, TRAIN, 2)
    assert (one.steps_per_epoch, one.warmup_steps, one.total_steps) == (10, 10, 100)
    assert (two.steps_per_epoch, two.warmup_steps, two.total_steps) == (5, 5, 50)
    assert schedule_geometry(N_TRAIN, TRAIN, 0) == one  # num_workers=0: the loop in the driver, one process


def test_resume_on_the_same_workers_continues_the_schedule():
    state = _trained_state(1, epochs=5)
    geometry, opt, sched, stopper = _fresh(1)
    assert restore_train_state(state, opt, sched, stopper, geometry) == 5
    cosine = 0.5 * (1 + math.cos(math.pi * (50 - 10) / (100 - 10)))  # step 50 of 100, after 10 of warmup
    assert sched.last_epoch == 50 and opt.param_groups[0]["lr"] == pytest.approx(cosine)


def test_resume_on_other_workers_is_refused_before_anything_is_restored():
    state = _trained_state(1, epochs=5)  # halfway: the LR is ~0.59 of the peak
    geometry, opt, sched, stopper = _fresh(2)
    with pytest.raises(ConfigError, match=r"train.num_workers=1, this run has train.num_workers=2; "
                                          r"resume with train.num_workers=1"):
        restore_train_state(state, opt, sched, stopper, geometry)
    assert sched.last_epoch == 0  # (restored, step 50 of a 50-step schedule would give LR 0 from here on)


def test_checkpoints_before_the_geometry_was_recorded_still_resume(caplog):
    state = _trained_state(1, epochs=2)
    del state["schedule"]
    geometry, opt, sched, stopper = _fresh(1)
    assert restore_train_state(state, opt, sched, stopper, geometry) == 2 and sched.last_epoch == 20
    assert "predates recorded LR schedules" in caplog.text


def test_driver_refuses_a_resume_with_other_workers_before_ray(tmp_path):
    cfg = ExperimentConfig().replace(**{"train.name": "r", "train.storage_path": str(tmp_path)})
    (tmp_path / "r").mkdir()
    cfg.to_yaml(tmp_path / "r" / "config.yaml")
    with pytest.raises(ConfigError, match=r"train.num_workers was 1 when the run started and is 2 now.*"
                                          r"set train.num_workers=1"):
        check_run_dir(cfg.replace(**{"train.num_workers": 2}), str(tmp_path / "r"), resume=True)
    check_run_dir(cfg.replace(**{"train.num_workers": 0}), str(tmp_path / "r"), resume=True)  # one process either way
