"""A `codistill run` that the fault suite can start, watch, break and start again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from codistill import names
from codistill.runfolder import Progress, RunFolder
from codistill.storage import Bucket, StorageError

from .kube import wait_for
from .localrun import manifest

# Two uninterrupted runs of the same manifest differ by up to about 0.05 nats in a group's final
# eval loss on a 2-core machine: when each teacher arrives depends on timing. A model that is
# broken, or an older one reported as final, is off by far more.
NOISE = 0.1
# How far behind a teacher may be (localrun's manifest allows 200 steps). On a loaded machine one
# group can run 100+ steps ahead of the other, and in these short runs (the loss still falls fast)
# distilling toward a teacher that old made the group ahead 0.13 nats worse than in a run where
# the groups kept pace. Two checkpoints' worth keeps that timing out of the comparison: a group
# far ahead trains on without a teacher instead.
STALENESS_CHECKPOINTS = 2


class FaultRun:
    """Two groups of one worker on the tiny LM fixture, in `tmp`, with `steps` steps and a
    checkpoint every `checkpoint`; `storage` as in the spec (default: the local folder `runs`);
    `model` overrides the LM's size arguments (seq_len, embed, hidden).
    The test itself reads the run at `read_endpoint` (default: the run's own), with one attempt
    and a short timeout: a store the test has hung must not hang its own reads for long."""

    def __init__(self, tmp: Path, name: str, steps: int, checkpoint: int = 50,
                 storage: dict[str, str] | None = None, read_endpoint: str | None = None,
                 env: dict[str, str] | None = None, model: dict[str, int] | None = None):
        self.tmp, self.name, self.steps, self.checkpoint = tmp, name, steps, checkpoint
        self.env = env or {}
        training = {"steps": steps, "batchSize": 8, "evalEverySteps": steps // 2,
                    "evalBatches": 2, "checkpointEverySteps": checkpoint,
                    "optimizer": {"lr": 0.01}}
        extra = {"storage": storage} if storage else {}
        self.manifest = manifest(tmp, name, workersPerGroup=1, training=training, **extra)
        doc = yaml.safe_load(self.manifest.read_text())
        doc["spec"]["task"]["args"].update(model or {})
        doc["spec"]["distillation"]["maxStalenessSteps"] = STALENESS_CHECKPOINTS * checkpoint
        self.manifest.write_text(yaml.safe_dump(doc))
        base = (storage or {}).get("url") or (tmp / "runs").resolve().as_uri()
        self.url = names.run_url(base, "default", name)
        keys = {k: v for k, v in self.env.items() if k in (names.ENV_ACCESS_KEY, names.ENV_SECRET_KEY)}
        self.bucket = Bucket(self.url, read_endpoint, keys or None, attempts=1, timeout=2)
        self.folder = RunFolder(self.bucket)
        self.proc: subprocess.Popen[str] | None = None
        self.log = tmp / f"{name}.out"

    def start(self, *flags: str, **env: str) -> subprocess.Popen[str]:
        """`codistill run` in the background; `env` on top of this run's (e.g. a failpoint)."""
        out = self.log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "codistill_trainer", "run", str(self.manifest), *flags],
            cwd=self.tmp, text=True, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, **self.env, **env})
        return self.proc

    def wait(self, timeout: float = 300.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def run(self, *flags: str, timeout: float = 300.0, **env: str) -> int:
        self.start(*flags, **env)
        return self.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def worker_log(self, group: int) -> str:
        """What the group's rank 0 logged so far ('' before it started)."""
        logs = sorted(self.tmp.glob(f".codistill/logs/*/{self.name}-g{group}-*-0.log"))
        return logs[0].read_text(errors="replace") if logs else ""

    def progress(self, group: int) -> Progress | None:
        try:
            return self.folder.progress(group)
        except StorageError:
            return None

    def step(self, group: int) -> int:
        p = self.progress(group)
        return p.step if p else 0

    def wait_step(self, group: int, step: int, timeout: float = 180.0) -> int:
        return wait_for(lambda: self.step(group) >= step and self.step(group),
                        f"group {group} at step {step}", timeout)

    def pointer_step(self, group: int, channel: str) -> int | None:
        doc = self.bucket.get_json(f"{names.group_dir(group)}/{channel}/{names.POINTER}")
        return doc["step"] if isinstance(doc, dict) else None

    def finished(self) -> dict[int, Any]:
        """Each group's final.json, checked to be at the last step."""
        finals = {g: self.folder.final(g) for g in (0, 1)}
        assert all(f is not None and f.step == self.steps for f in finals.values()), finals
        return finals

    def final_models_reported(self) -> dict[int, float]:
        """The report evaluated each group's final model, not an older one (D3): its loss for a
        group equals the group's own last eval (both on the same fixed eval set)."""
        finals, report = self.finished(), self.folder.report()
        assert report is not None, self.output()[-3000:]
        losses = {g.group: g.loss for g in report.groups}
        for g, final in finals.items():
            assert abs(losses[g] - final.eval_loss) < 1e-4, (g, losses[g], final.eval_loss)
        return losses

    def as_good_as(self, baseline: dict[int, float]) -> None:
        """The final models, reported, are within NOISE of an uninterrupted run's."""
        losses = self.final_models_reported()
        assert all(abs(losses[g] - baseline[g]) < NOISE for g in baseline), (losses, baseline)
