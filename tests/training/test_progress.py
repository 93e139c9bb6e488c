"""training/progress.py directly: the reporter's throttling and the printer's lines, without Ray
(the printer's queue is a Ray actor; ``format`` and the reporter are plain Python)."""

from __future__ import annotations

import queue

import pytest

from cxr_ray.training import progress
from cxr_ray.training.progress import ProgressPrinter, ProgressReporter, _duration


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (59.4, "59s"), (61, "1m01s"), (3600, "1h00m"),
                                          (7322, "2h02m"), (-5, "0s")])
def test_durations_read_as_a_person_would_write_them(seconds, text):
    assert _duration(seconds) == text


def test_reporter_sends_every_event_but_throttles_batches(monkeypatch):
    q: queue.Queue = queue.Queue()
    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    r = ProgressReporter(q, interval_s=10.0)
    r.emit("start", epochs=2, start_epoch=0, images=64, precision="bf16")
    r.batch(0, 16, 1.0)  # 0 s since the reporter started: held back
    now[0] += 10.0
    r.batch(0, 32, 2.0)  # the interval has passed: sent
    now[0] += 3.0
    r.batch(0, 48, 3.0)  # 3 s later: held back
    events = [q.get_nowait() for _ in range(q.qsize())]
    assert [e["kind"] for e in events] == ["start", "batch"]
    assert events[1] == {"kind": "batch", "epoch": 0, "images": 32, "seconds": 2.0}


def test_a_failing_queue_silences_the_reporter_without_stopping_training():
    class Broken:
        calls = 0

        def put_nowait(self, item):
            Broken.calls += 1
            raise RuntimeError("the driver's queue actor is gone")

    r = ProgressReporter(Broken(), interval_s=0.0)
    r.emit("epoch", epoch=0)  # no exception reaches the training loop
    r.emit("epoch", epoch=1)
    assert Broken.calls == 1 and r.queue is None
    ProgressReporter(None).emit("start")  # tune trials: no queue, silent


def _printer(metric: str = "selection_score") -> ProgressPrinter:
    """A printer without its Ray queue (``format`` only reads and updates its counters)."""
    p = ProgressPrinter.__new__(ProgressPrinter)
    p.metric, p.epochs, p.images, p.epochs_done = metric, 0, 0, 0
    p.started = p.training_started = progress.time.monotonic()
    return p


def test_printer_lines_for_start_resume_batch_epoch_and_stop():
    p = _printer()
    assert p.format({"kind": "start", "epochs": 4, "start_epoch": 0, "images": 1000, "precision": "bf16"}) == \
        "[train] training 4 epoch(s) on 1,000 images per worker in bf16"
    line = p.format({"kind": "batch", "epoch": 0, "images": 250, "seconds": 5.0})
    assert line.startswith("[train] epoch 1/4: 250/1,000 images (25%), 50.0 img/s, epoch ETA ")
    assert line.endswith("15s")  # 750 images left at 50 img/s
    metrics = {"train_loss": 0.5, "val_loss": 0.4, "roc_auc": 0.9, "pauc": 0.7, "train_images_per_s": 50.0,
               "best_epoch": 0}
    line = p.format({"kind": "epoch", "epoch": 0, "seconds": 20.0, "metrics": metrics})
    assert "epoch 1/4: train_loss 0.5000  val_loss 0.4000  val roc_auc 0.9000  pauc 0.7000" in line
    assert line.endswith("(best)") and "ETA -" not in line  # 3 epochs to go: an ETA, not "-"
    last = p.format({"kind": "epoch", "epoch": 3, "seconds": 20.0, "metrics": {**metrics, "best_epoch": 1}})
    assert "ETA -" in last and "(best)" not in last
    assert p.format({"kind": "stop", "epoch": 2, "best_epoch": 0}) == \
        "[train] early stop after epoch 3: no improvement of selection_score since epoch 1"
    resumed = _printer().format({"kind": "start", "epochs": 10, "start_epoch": 4, "images": 10, "precision": ""})
    assert resumed == "[train] resumed from checkpoint after epoch 4/10; 6 epoch(s) to go"
    assert p.format({"kind": "unknown"}) == ""


def test_printer_shows_the_selection_metric_by_name():
    p = _printer("roc_auc")
    p.format({"kind": "start", "epochs": 1, "start_epoch": 0, "images": 10})
    m = {"train_loss": 0.1, "val_loss": 0.2, "roc_auc": 0.8, "train_images_per_s": 1.0}
    assert "val roc_auc 0.8000  roc_auc 0.8000" in p.format({"kind": "epoch", "epoch": 0, "seconds": 1, "metrics": m})


def test_trial_lines_of_a_search():
    from cxr_ray.training.progress import trial_line
    from cxr_ray.training.tune import TrialProgress

    config = {"train.lr": 0.0012345, "model.width": 16}
    assert trial_line("start", "a1", config, None, "selection_score", 4) == \
        "[tune] trial a1 started: model.width=16, train.lr=0.00123"
    result = {"training_iteration": 2, "roc_auc": 0.91, "selection_score": 0.7}
    assert trial_line("result", "a1", config, result, "selection_score", 4) == \
        "[tune] trial a1 epoch 2/4: val roc_auc 0.9100  val selection_score 0.7000"
    assert trial_line("result", "a1", config, result, "roc_auc", 4) == "[tune] trial a1 epoch 2/4: val roc_auc 0.9100"
    assert trial_line("complete", "a1", config, None, "roc_auc", 4) == "[tune] trial a1 finished"
    assert trial_line("complete", "a1", config, result, "roc_auc", 4) == "[tune] trial a1 finished after 2/4 epoch(s)"
    assert trial_line("result", "a1", config, {"training_iteration": 1}, "roc_auc", 4) == "[tune] trial a1 epoch 1/4"
    import numpy as np

    assert trial_line("result", "a1", config, {"roc_auc": np.float32(0.5)}, "roc_auc", 4).endswith("val roc_auc 0.5000")
    assert "FAILED" in trial_line("error", "a1", config, None, "roc_auc", 4)
    import pickle

    assert pickle.loads(pickle.dumps(TrialProgress("roc_auc", 3))).epochs == 3  # Tune stores it with the experiment
