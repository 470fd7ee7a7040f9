"""`codistill run` for real: local processes, gloo DDP, a local folder as the bucket."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.support.localrun import codistill, manifest, read_json, start, workers_of

pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """y at x, linear between the records, clamped at the ends."""
    i = max(0, min(len(xs) - 1, sum(v <= x for v in xs) - 1))
    if i + 1 >= len(xs):
        return ys[i]
    frac = max(0.0, min(1.0, (x - xs[i]) / max(xs[i + 1] - xs[i], 1e-9)))
    return ys[i] + frac * (ys[i + 1] - ys[i])


def peer_lags(history: list[dict], peer: list[dict], exchange: int,
              reload: int) -> list[tuple[float, float]]:
    """For each record of a group: how far its teacher was behind the peer's own step at that
    moment (the peer's step interpolated from its history by wall time), and the bound that
    publishing and polling promise: one publish period, plus what the peer advanced while this
    group took its last `reload` steps (the peer may run faster, e.g. on a loaded machine),
    plus the resolution of the two histories (a record per PROGRESS_EVERY = 10 steps each).
    Own step minus teacher step would also count the drift between two unsynchronised groups,
    which no exchange period can bound."""
    timed, own = [h for h in peer if "time" in h], [h for h in history if "time" in h]

    def peer_step(t: float) -> float:
        return interpolate([h["time"] for h in timed], [h["step"] for h in timed], t)

    def own_time(step: float) -> float:
        return interpolate([h["step"] for h in own], [h["time"] for h in own], step)

    out = []
    for h in history:
        if h.get("staleness") is not None:
            lag = peer_step(h["time"]) - (h["step"] - h["staleness"])
            advanced = peer_step(h["time"]) - peer_step(own_time(h["step"] - reload - 10))
            out.append((lag, exchange + advanced + 2 * 10))
    return out


def test_two_groups_of_two_workers_distill_from_each_other(tmp_path):
    path = manifest(tmp_path, training={"steps": 300, "batchSize": 16, "evalEverySteps": 100,
                                        "evalBatches": 2, "checkpointEverySteps": 100},
                    distillation={"burnInSteps": 20, "exchangeEverySteps": 20,
                                  "reloadEverySteps": 20, "maxStalenessSteps": 400,
                                  "pollIntervalSeconds": 0.05})
    res = codistill("run", str(path), cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    run = tmp_path / "runs" / "default" / "t"
    progress = [read_json(run / "groups" / str(g) / "progress.json") for g in (0, 1)]
    for group, prog in enumerate(progress):
        assert prog["state"] == "finished" and prog["step"] == 300
        assert str(1 - group) in prog["teachers"], prog
        distilled = [h["step"] for h in prog["history"] if h.get("distillLoss") is not None]
        assert distilled and min(distilled) > 20  # nothing before burnInSteps
        lags = peer_lags(prog["history"], progress[1 - group]["history"], 20, 20)
        assert lags and all(lag <= bound for lag, bound in lags), lags
    report = read_json(run / "report" / "report.json")
    assert report["ensemble"]["loss"] > 0 and len(report["churn"]["pairs"]) == 1
    assert (run / "report" / "curves.png").read_bytes()[:8] == PNG
    assert "ensemble" in res.stdout and "churn" in res.stdout
    assert not workers_of(run.as_uri())
    status = codistill("status", str(run), cwd=tmp_path)
    assert status.returncode == 0 and "finished" in status.stdout


def test_killed_worker_stops_the_run_and_resumes_from_last_state(tmp_path):
    path = manifest(tmp_path, name="r", workersPerGroup=1,
                    training={"steps": 600, "batchSize": 8, "checkpointEverySteps": 20,
                              "evalEverySteps": 100, "evalBatches": 1})
    run = tmp_path / "runs" / "default" / "r"
    launcher = start("run", str(path), cwd=tmp_path)
    pointer = run / "groups" / "0" / "state" / "LATEST.json"
    wait_for(lambda: pointer.exists() and read_json(pointer)["step"] >= 40, what="a saved state")
    victim = next(pid for pid, env in workers_of(run.as_uri()).items()
                  if env.get("CODISTILL_GROUP") == "0")
    os.kill(victim, signal.SIGKILL)
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 1, out
    assert "exited with code -9" in out and "r-g0-master-0" in out
    assert not workers_of(run.as_uri())  # the other group was stopped too
    saved = read_json(pointer)["step"]
    res = codistill("run", str(path), cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    prog = read_json(run / "groups" / "0" / "progress.json")
    assert prog["resumedFrom"] >= saved >= 40 and prog["step"] == 600
    assert prog["history"][0]["step"] < saved  # the curve from before the kill is kept


@pytest.mark.parametrize("sig, says", [(signal.SIGINT, "interrupted"),
                                       (signal.SIGTERM, "SIGTERM"), (signal.SIGHUP, "SIGHUP")])
def test_ctrl_c_stops_every_worker(tmp_path, sig, says):
    path = manifest(tmp_path, name="c", training={"steps": 50000, "batchSize": 8})
    run = tmp_path / "runs" / "default" / "c"
    launcher = start("run", str(path), cwd=tmp_path)
    wait_for(lambda: (run / "groups" / "1" / "progress.json").exists(), what="progress")
    launcher.send_signal(sig)
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 1 and says in out
    assert not workers_of(run.as_uri())


def test_several_processes_per_pod_go_through_torchrun(tmp_path):
    path = manifest(tmp_path, name="n", groups=1, workersPerGroup=1, nprocPerWorker=2,
                    training={"steps": 20, "batchSize": 8, "evalEverySteps": 10,
                              "evalBatches": 2, "checkpointEverySteps": 10})
    res = codistill("run", str(path), cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    log = (tmp_path / ".codistill" / "logs" / "default-n" / "n-g0-master-0.log").read_text()
    assert "g0 r0" in log and "g0 r1" in log and "of 2 shards" in log
    assert read_json(tmp_path / "runs/default/n/groups/0/progress.json")["state"] == "finished"


def test_run_against_s3_bucket(tmp_path, s3):
    """The workers reach moto's S3 server through the env contract (endpoint, credentials)."""
    path = manifest(tmp_path, name="s", workersPerGroup=1,
                    training={"steps": 60, "batchSize": 8, "evalEverySteps": 30,
                              "evalBatches": 2, "checkpointEverySteps": 30},
                    storage={"url": "s3://codistill-test/runs", "endpoint": s3})
    res = codistill("run", str(path), cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    url = "s3://codistill-test/runs/default/s"
    status = codistill("status", url, cwd=tmp_path)
    assert status.returncode == 0 and status.stdout.count("finished") == 2, status.stdout
    from codistill.storage import Bucket

    bucket = Bucket(url)
    assert bucket.get_json("report/report.json")["churn"]["pairs"]
    assert bucket.get_json("groups/0/teacher/LATEST.json")["step"] == 60
    assert not (tmp_path / "runs").exists()  # nothing went to the local default


def test_a_users_own_task_trains_and_only_an_allowed_one_is_imported_from_the_folder(tmp_path):
    """examples/custom.yaml, shortened: its workers import the task the manifest names (the
    launcher passes it as CODISTILL_TASKS); `codistill report` of the folder, whose run.json
    anyone with bucket access could have written, imports it only when told to."""
    root = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((root / "examples" / "custom.yaml").read_text())
    assert doc["spec"]["groups"] == 3 and doc["spec"]["distillation"]["teachers"] == 1
    doc["spec"]["training"].update(steps=40, evalEverySteps=20, checkpointEverySteps=20)
    doc["spec"]["distillation"].update(burnInSteps=10, exchangeEverySteps=10,
                                       reloadEverySteps=10, pollIntervalSeconds=0.05)
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONPATH": str(root / "examples" / "custom_task")}
    env.pop("CODISTILL_TASKS", None)
    res = codistill("run", str(path), cwd=tmp_path, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    run = tmp_path / "runs" / "default" / "spirals"
    assert read_json(run / "report" / "report.json")["ensemble"]["loss"] > 0
    # `teachers: 1`: each group holds at most the last period's drawn peer (whether it arrived
    # in time depends on pacing here: tests/unit/test_bench.py steps the draw deterministically)
    for group in range(3):
        held = read_json(run / "groups" / str(group) / "progress.json")["teachers"]
        assert len(held) <= 1 and str(group) not in held, held
    refused = codistill("report", str(run), cwd=tmp_path, env=env)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "CODISTILL_TASKS=spirals:make_task" in refused.stdout + refused.stderr
    allowed = codistill("report", str(run), cwd=tmp_path,
                        env={**env, "CODISTILL_TASKS": "spirals:make_task"})
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
