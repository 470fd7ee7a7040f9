"""The meter behind a group's `progress.json` (schema: `codistill.runfolder.Progress`).

Rank 0 of each group keeps running averages since the last record; `snapshot()` turns them into
the file's model, which the background uploader writes whole (one PUT, so readers never see half
of it). The live display, `codistill status` and the operator read it back.
"""

from __future__ import annotations

import math
import time
from typing import Any

from codistill.runfolder import Progress

MAX_HISTORY = 400  # points kept for the curves; older ones are thinned out


class ProgressMeter:
    def __init__(self, group: int, steps: int):
        self.group, self.steps = group, steps
        self.history: list[dict[str, Any]] = []
        self.state = "starting"
        self.step = 0
        self.resumed_from: int | None = None
        self.restarts = 0
        self.last_published: int | None = None
        self.eval: dict[str, float] = {}
        self._sums: dict[str, float] = {}
        self._count = 0
        self._examples = 0
        self._staleness: int | None = None  # max over the interval of the teachers used
        self._since = time.monotonic()
        self.rate = 0.0
        self.last: dict[str, float | None] = {}

    def add(self, step: int, examples: int, staleness: int | None) -> None:
        """Count one step, its examples and the staleness of its teachers."""
        self.step, self._count, self._examples = step, self._count + 1, self._examples + examples
        if staleness is not None:
            self._staleness = max(staleness, self._staleness or staleness)

    def add_losses(self, **losses: float | None) -> None:
        """Add (group-averaged) losses summed over the steps counted since the last call."""
        for key, value in losses.items():
            if value is not None:
                self._sums[key] = self._sums.get(key, 0.0) + value

    def record(self) -> None:
        """Close the current interval: averages become the latest values and a history point."""
        if not self._count:
            return
        elapsed = max(time.monotonic() - self._since, 1e-9)
        self.rate = self._examples / elapsed
        self.last = {k: v / self._count for k, v in self._sums.items()}
        self.last.setdefault("distillLoss", None)
        self.history.append(
            {"step": self.step, "time": time.time(), **self.last, "staleness": self._staleness}
        )
        if len(self.history) > MAX_HISTORY:  # keep the ends, thin the middle
            self.history = self.history[:1] + self.history[1:-1:2] + self.history[-1:]
        self._sums, self._count, self._examples, self._staleness = {}, 0, 0, None
        self._since = time.monotonic()

    def restore(self, history: list[dict]) -> None:
        """Resume from a saved history: the latest training and eval figures come back with it,
        so a group resumed at its last step (killed during its finish) still reports them."""
        self.history = list(history)
        for h in reversed(self.history):
            if not self.last and "loss" in h:
                self.last = {k: h.get(k) for k in ("loss", "taskLoss", "distillLoss")}
            if not self.eval and "evalLoss" in h:
                self.eval = {"evalLoss": h["evalLoss"], "evalAccuracy": h.get("evalAccuracy")}

    def record_eval(self, step: int, loss: float, accuracy: float) -> None:
        self.eval = {"evalLoss": loss, "evalAccuracy": accuracy}
        self.history.append({"step": step, **self.eval})

    def snapshot(
        self, teachers: dict[int, int], staleness: dict[int, int], warnings: list[str]
    ) -> Progress:
        """The file as of now; history is copied, so the uploader may write it later."""
        def clean(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else round(v, 6)

        return Progress(
            group=self.group,
            step=self.step,
            steps=self.steps,
            state=self.state,
            loss=clean(self.last.get("loss")),
            task_loss=clean(self.last.get("taskLoss")),
            distill_loss=clean(self.last.get("distillLoss")),
            eval_loss=clean(self.eval.get("evalLoss")),
            eval_accuracy=clean(self.eval.get("evalAccuracy")),
            teachers={str(p): s for p, s in teachers.items()},
            staleness={str(p): s for p, s in staleness.items()},
            last_published=self.last_published,
            examples_per_sec=round(self.rate, 2),
            time=time.time(),
            resumed_from=self.resumed_from,
            restarts=self.restarts,
            warnings=warnings,
            history=[dict(h) for h in self.history],
        )
