"""The final report: ensemble and churn maths on hand-made numbers, evaluate() on tiny real models,
and write() to a local folder and to moto's S3 server."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codistill.runfolder import Progress, RunFolder
from codistill.storage import Bucket
from codistill_trainer import report
from codistill_trainer.tasks.base import Batch, Task

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def onehot_probs(classes: list[int], num_classes: int = 3) -> torch.Tensor:
    """Confident predictions of the given top classes."""
    return F.one_hot(torch.tensor(classes), num_classes).float() * 0.7 + 0.1


def test_identical_models_have_no_churn() -> None:
    p = torch.softmax(torch.randn(50, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    assert report.churn(p, p.clone()) == {"flip": 0.0, "mad": 0.0}


def test_flip_counts_disagreements() -> None:
    a = onehot_probs([0, 1, 2, 0, 1, 2, 0, 1])
    b = onehot_probs([0, 1, 2, 1, 1, 0, 0, 1])  # differs on exactly 2 of 8
    assert report.churn(a, b)["flip"] == pytest.approx(2 / 8)


def test_binary_mad_is_mean_abs_difference_of_p() -> None:
    gen = torch.Generator().manual_seed(2)
    pa, pb = torch.rand(100, generator=gen), torch.rand(100, generator=gen)
    a, b = torch.stack([1 - pa, pa], dim=1), torch.stack([1 - pb, pb], dim=1)
    assert report.churn(a, b)["mad"] == pytest.approx((pa - pb).abs().mean().item(), rel=1e-5)


def test_pairwise_churn_covers_every_pair_and_averages() -> None:
    probs = {0: onehot_probs([0, 0, 0, 0]), 1: onehot_probs([1, 0, 0, 0]),
             2: onehot_probs([1, 1, 0, 0])}
    out = report.pairwise_churn(probs)
    flips = {(p["a"], p["b"]): p["flip"] for p in out["pairs"]}
    assert flips == {(0, 1): 0.25, (0, 2): 0.5, (1, 2): 0.25}
    assert out["mean"]["flip"] == pytest.approx(1 / 3)


def test_nll_of_probabilities_matches_cross_entropy_of_logits() -> None:
    gen = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(20, 5, generator=gen), torch.randint(0, 5, (20,), generator=gen)
    got = report.nll(logits.softmax(dim=1), targets)
    assert got == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)


def test_ensemble_averages_probabilities_and_can_beat_its_members() -> None:
    # Each member is right on one example and confidently wrong-ish on the other; together right.
    a = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    b = torch.tensor([[0.4, 0.6], [0.1, 0.9]])
    targets = torch.tensor([0, 1])
    mean = report.ensemble([a, b])
    assert torch.allclose(mean, torch.tensor([[0.65, 0.35], [0.35, 0.65]]))
    assert report.accuracy(a, targets) == report.accuracy(b, targets) == 0.5
    assert report.accuracy(mean, targets) == 1.0


class TinyTask(Task):
    """Three-class classification of 4 features; eval data is a fixed function of the seed."""

    name = "tiny"

    def model(self) -> nn.Module:
        return nn.Linear(4, 3)

    def train_data(self, shard: int, num_shards: int):
        raise NotImplementedError("eval only")

    def eval_data(self, batch_size: int, batches: int) -> list[Batch]:
        gen = torch.Generator().manual_seed(7)
        return [Batch(torch.randn(batch_size, 4, generator=gen),
                      torch.randint(0, 3, (batch_size,), generator=gen)) for _ in range(batches)]

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(output, batch.targets)

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        return output


def linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def test_evaluate_two_models_against_direct_computation() -> None:
    task = TinyTask()
    batches = task.eval_data(batch_size=16, batches=3)
    x = torch.cat([b.inputs for b in batches])
    y = torch.cat([b.targets for b in batches])
    models = {0: linear(0), 1: linear(1)}
    out = report.evaluate(task, models, batches)

    assert out["examples"] == 48
    with torch.no_grad():
        la, lb = models[0](x), models[1](x)
    for g, logits in ((0, la), (1, lb)):
        row = out["groups"][g]
        assert row["group"] == g
        assert row["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
        assert row["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    mean = (la.softmax(1) + lb.softmax(1)) / 2
    assert out["ensemble"]["loss"] == pytest.approx(F.nll_loss(mean.log(), y).item(), rel=1e-5)
    flip = (la.argmax(1) != lb.argmax(1)).float().mean().item()
    assert out["churn"]["pairs"] == [
        {"a": 0, "b": 1, "flip": pytest.approx(flip), "mad": pytest.approx(
            (la.softmax(1) - lb.softmax(1)).abs().mean().item(), rel=1e-5)}]
    json.dumps(out)  # plain JSON, ready for report.json


def test_evaluate_uses_eval_mode_and_restores_the_mode() -> None:
    task = TinyTask()
    batches = task.eval_data(batch_size=8, batches=2)
    lin = linear(0)
    noisy = nn.Sequential(nn.Dropout(0.9), lin).train()
    out = report.evaluate(task, {0: noisy, 1: lin}, batches)
    assert out["churn"]["mean"] == {"flip": 0.0, "mad": 0.0}  # dropout off: identical outputs
    assert out["ensemble"]["loss"] == pytest.approx(out["groups"][1]["loss"], rel=1e-5)
    assert noisy.training and not any(p.grad is not None for p in lin.parameters())


def test_evaluate_one_group_has_no_ensemble_or_churn() -> None:
    task = TinyTask()
    out = report.evaluate(task, {0: linear(0)}, task.eval_data(4, 1))
    assert out["ensemble"] is None and out["churn"] is None
    with pytest.raises(ValueError, match="at least one model"):
        report.evaluate(task, {}, task.eval_data(4, 1))


def progress_of(g: int) -> dict:
    history = [{"step": s, "loss": 2.0 - s / 100 - g / 10, "taskLoss": 1.9, "distillLoss": None}
               for s in range(10, 101, 10)]
    for h in history[4::5]:
        h["evalLoss"] = h["loss"] + 0.1
    return {"group": g, "step": 100, "steps": 100, "state": "finished", "loss": 1.0,
            "evalLoss": 1.1, "evalAccuracy": 0.5, "resumedFrom": None, "history": history}


@pytest.fixture(params=["local", "s3"])
def bucket(request: pytest.FixtureRequest, tmp_path) -> Bucket:
    if request.param == "s3":
        request.getfixturevalue("s3")
        return Bucket("s3://codistill-test/default/demo")
    return Bucket(str(tmp_path / "runs" / "default" / "demo"))


def test_write_report_files(bucket: Bucket) -> None:
    task = TinyTask()
    result = report.evaluate(task, {0: linear(0), 1: linear(1)}, task.eval_data(8, 2))
    progress = {0: Progress.parse(progress_of(0), 0), 1: Progress.parse(progress_of(1), 1), 2: None}
    report.write(RunFolder(bucket), result, progress)

    assert bucket.get("report/curves.png").startswith(PNG_SIGNATURE)
    doc = bucket.get_json("report/report.json")
    assert set(doc) == {"examples", "groups", "ensemble", "churn", "training"}
    assert doc["ensemble"]["loss"] == pytest.approx(result["ensemble"]["loss"])
    assert [t["state"] for t in doc["training"]] == ["finished", "finished", None]
    summary = bucket.get("report/summary.md").decode()
    assert "| ensemble |" in summary and "| churn 0 vs 1 |" in summary


def test_the_report_waits_out_a_store_that_fails_and_never_fails_the_group(monkeypatch,
                                                                           caplog) -> None:
    """The last group to finish writes the report; a store outage then is waited out, and one
    that outlasts the final publish's timeout is left to `codistill report`, without a crash."""
    from codistill.storage import StorageError
    from codistill_trainer import worker

    calls = []

    def flaky(folder, run, fails: int = 2) -> bool:
        calls.append(1)
        if len(calls) <= fails:
            raise StorageError("read s3://b/run/groups/1/final.json: EndpointConnectionError")
        return True

    folder = RunFolder(Bucket("memory://report-test"))
    monkeypatch.setattr(worker.time, "sleep", lambda s: None)
    monkeypatch.setattr(worker, "write_report", flaky)
    worker._report(folder, None)
    assert len(calls) == 3
    monkeypatch.setattr(worker, "FINAL_TIMEOUT_S", 0.0)
    monkeypatch.setattr(worker, "write_report", lambda f, r: flaky(f, r, fails=10**6))
    worker._report(folder, None)  # gives up, and says how to write it later
    assert "report not written (read s3://b/run" in caplog.text
    assert "codistill report memory://report-test" in caplog.text
