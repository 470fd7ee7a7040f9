"""The loop in one process: `groups: 1` is plain training, and resume replays exactly."""

from __future__ import annotations

import torch

from codistill import spec
from codistill.runfolder import RunFolder
from codistill.storage import Bucket
from codistill_trainer.loop import Loop, Member, build_optimizer
from codistill_trainer.tasks import resolve
from tests.support.datafixtures import make_tiny_data


def run_spec(tmp_path, steps: int, groups: int = 1) -> spec.Codistillation:
    data = make_tiny_data(tmp_path / "data")
    return spec.parse({
        "apiVersion": "codistill.io/v1alpha1", "kind": "Codistillation", "metadata": {"name": "u"},
        "spec": {"groups": groups, "workersPerGroup": 1,
                 "task": {"name": "lm", "args": {"data_dir": str(data), "seq_len": 8,
                                                 "embed": 8, "hidden": 16}},
                 "training": {"steps": steps, "batchSize": 4, "evalEverySteps": 5,
                              "evalBatches": 1, "checkpointEverySteps": 5,
                              "optimizer": {"lr": 0.01, "warmupSteps": 2, "schedule": "cosine"}}},
    })


def loop(tmp_path, run: spec.Codistillation) -> Loop:
    bucket = Bucket((tmp_path / "bucket").as_uri())
    return Loop(Member(run, 0, 0, 1, bucket, torch.device("cpu")))


def test_one_group_is_plain_training(tmp_path):
    torch.set_num_threads(1)
    run = run_spec(tmp_path, steps=12)
    trained = loop(tmp_path, run)
    trained.run()
    # the same steps written out by hand: no teachers, no distillation term
    task = resolve(run.spec.task.name, run.spec.task.args)
    torch.manual_seed(run.spec.training.seed * 1000)
    model = task.model()
    opt, sched = build_optimizer(model, run.spec.training)
    data = task.train_data(0, 1)
    for step in range(12):
        batch = data.batch(step, 4, 0)
        loss = task.loss(task.forward(model, batch), batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    for (name, a), b in zip(trained.model.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_resume_continues_exactly(tmp_path):
    torch.set_num_threads(1)
    full = loop(tmp_path / "a", run_spec(tmp_path, steps=10))
    full.run()
    killed = loop(tmp_path / "b", run_spec(tmp_path, steps=10))
    killed.report_progress()  # as run() does first
    for step in range(7):  # dies after step 7; its last saved state is step 5
        killed.step(step)
        killed.after_step(step + 1)
    killed.uploader.close()
    assert killed.progress.restarts == 0
    resumed = loop(tmp_path / "b", run_spec(tmp_path, steps=10))
    assert resumed.start == 5 and resumed.progress.resumed_from == 5
    assert resumed.progress.restarts == 1  # counted by the trainer, from its own progress file
    resumed.run()
    assert RunFolder(resumed.w.bucket).progress(0).restarts == 1
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path):
    import pytest

    from codistill_trainer.loop import NonFiniteLoss

    trainer = loop(tmp_path, run_spec(tmp_path, steps=10))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real_loss = trainer.task.loss
    trainer.task.loss = lambda out, batch: real_loss(out, batch) * float("nan")
    with pytest.raises(NonFiniteLoss, match="step 0: loss is nan"):
        trainer.run()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert trainer.w.bucket.get_json("groups/0/progress.json")["state"] == "failed"
