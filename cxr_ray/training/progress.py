"""Training progress a user can see on the driver: an epoch line and in-epoch progress.

Ray Train workers run in other processes, and their log lines reach the terminal only
through Ray's worker-log prefix, if at all. Rank 0 therefore sends small progress events
through a Ray queue (:class:`ProgressReporter`); the driver prints them as they arrive
(:class:`ProgressPrinter`), while ``trainer.fit()`` blocks the main thread.

Event schema (dicts): ``{"kind": "start", "epochs", "start_epoch", "images", "precision"}``,
``{"kind": "batch", "epoch", "images", "seconds"}``, ``{"kind": "epoch", "epoch", "seconds",
"metrics"}``, ``{"kind": "stop", "epoch", "best_epoch"}``, ``{"kind": "note", "text"}`` (a warning
for the user: workers' own log lines stay in Ray's log files).
"""

from __future__ import annotations

import sys
import threading
import time
from numbers import Real
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressReporter:
    """Worker side (rank 0): puts events on the driver's queue, in-epoch ones at most every
    ``interval_s`` seconds. Without a queue (tune trials: :class:`TrialProgress` reports them
    from Tune's results) it is silent. A queue error never stops training."""

    def __init__(self, queue: Any | None, interval_s: float = 10.0):
        self.queue = queue
        self.interval_s = interval_s
        self._last = time.monotonic()

    def emit(self, kind: str, **data: Any) -> None:
        if self.queue is None:
            return
        try:
            self.queue.put_nowait({"kind": kind, **data})
        except Exception:  # noqa: BLE001 - progress is best effort
            self.queue = None

    def batch(self, epoch: int, images: int, seconds: float) -> None:
        """Called after every training batch; emits when ``interval_s`` has passed."""
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self.emit("batch", epoch=epoch, images=images, seconds=seconds)


class ProgressPrinter:
    """Driver side: owns the queue and a thread printing each event as one line."""

    def __init__(self, selection_metric: str, stream: TextIO | None = None):
        from ray.util.queue import Queue

        self.metric = selection_metric
        self.stream = stream or sys.stderr  # progress, with the logs: stdout holds results only
        self.queue = Queue(actor_options={"num_cpus": 0})  # must not take a CPU from training
        self.epochs = 0
        self.images = 0
        self.started = self.training_started = time.monotonic()
        self.epochs_done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cxr-progress", daemon=True)

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001 - Ray may already be shutting down
            pass

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self.print(self.queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - Ray shut down under us: nothing more to print
                return

    def _drain(self) -> None:
        try:
            while not self.queue.empty():
                self.print(self.queue.get_nowait())
        except Exception:  # noqa: BLE001
            pass

    def print(self, event: dict[str, Any]) -> None:
        line = self.format(event)
        if line:
            print(line, file=self.stream, flush=True)

    def format(self, e: dict[str, Any]) -> str:
        """One line for an event (see the module doc); epochs are shown 1-based."""
        kind = e["kind"]
        if kind == "start":
            self.epochs, self.images = int(e["epochs"]), int(e["images"])
            self.training_started = time.monotonic()  # the ETA leaves out Ray and data start-up
            how = f" in {e['precision']}" if e.get("precision") else ""
            if e["start_epoch"]:
                return (f"[train] resumed from checkpoint after epoch {e['start_epoch']}/{self.epochs}; "
                        f"{self.epochs - e['start_epoch']} epoch(s) to go{how}")
            return f"[train] training {self.epochs} epoch(s) on {self.images:,} images per worker{how}"
        if kind == "batch":
            rate = e["images"] / max(e["seconds"], 1e-9)
            left = max(self.images - e["images"], 0) / max(rate, 1e-9)
            pct = 100 * e["images"] / max(self.images, 1)
            return (f"[train] epoch {e['epoch'] + 1}/{self.epochs}: {e['images']:,}/{self.images:,} images "
                    f"({pct:.0f}%), {rate:.1f} img/s, epoch ETA {_duration(left)}")
        if kind == "epoch":
            self.epochs_done += 1
            m = e["metrics"]
            elapsed = time.monotonic() - self.started
            remaining = self.epochs - (e["epoch"] + 1)
            eta = (time.monotonic() - self.training_started) / self.epochs_done * remaining
            best = "  (best)" if m.get("best_epoch") == e["epoch"] else ""
            # selection_score is pAUC with a tiny loss tie-break: show the pAUC people know
            shown = "pauc" if self.metric == "selection_score" else self.metric
            return (f"[train] epoch {e['epoch'] + 1}/{self.epochs}: train_loss {m['train_loss']:.4f}  "
                    f"val_loss {m['val_loss']:.4f}  val roc_auc {m['roc_auc']:.4f}  "
                    f"{shown} {m[shown]:.4f}  {m['train_images_per_s']:.1f} img/s  "
                    f"elapsed {_duration(elapsed)}  ETA {_duration(eta) if remaining else '-'}{best}")
        if kind == "stop":
            return (f"[train] early stop after epoch {e['epoch'] + 1}: no improvement of {self.metric} "
                    f"since epoch {e['best_epoch'] + 1}")
        if kind == "note":
            return str(e["text"])
        return ""


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, Real) and not isinstance(value, int) else str(value)


def trial_line(event: str, trial_id: str, config: dict[str, Any], result: dict[str, Any] | None,
               metric: str, epochs: int) -> str:
    """One ``[tune]`` line of a search's progress (see :class:`TrialProgress`)."""
    if event == "start":
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(config.items()))
        return f"[tune] trial {trial_id} started: {params or 'the base config'}"
    if event == "result":
        r = result or {}
        auc, score = r.get("roc_auc"), r.get(metric)
        shown = (("val roc_auc", auc),) + ((("val " + metric, score),) if metric != "roc_auc" else ())
        figures = "  ".join(f"{name} {float(v):.4f}" for name, v in shown if isinstance(v, Real))
        return f"[tune] trial {trial_id} epoch {r.get('training_iteration', '?')}/{epochs}" + (
            f": {figures}" if figures else "")
    if event == "complete":
        done = (result or {}).get("training_iteration")
        return f"[tune] trial {trial_id} finished" + (f" after {done}/{epochs} epoch(s)" if done else "")
    return f"[tune] trial {trial_id} FAILED (its error.txt is in the experiment folder; trials.csv lists it)"
