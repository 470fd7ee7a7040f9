"""The loop in one process: `groups: 1` is plain training, and resume replays exactly."""

from __future__ import annotations

import time

import pytest
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


def test_a_non_finite_loss_stops_the_group_before_its_weights_leave_the_process(tmp_path):
    """The losses are checked at the first boundary (step 5: eval and checkpoint), before the
    save: no state or teacher of those steps reaches the bucket, and the group says it failed."""
    import pytest

    from codistill import names
    from codistill_trainer.loop import NonFiniteLoss

    trainer = loop(tmp_path, run_spec(tmp_path, steps=10))
    real_loss = trainer.task.loss
    trainer.task.loss = lambda out, batch: real_loss(out, batch) * float("nan")
    with pytest.raises(NonFiniteLoss, match="loss is nan in the steps up to 5; stopping before"):
        trainer.run()
    bucket = trainer.w.bucket
    assert bucket.ls(names.state_dir(0)) == [] and bucket.ls(names.teacher_dir(0)) == []
    assert bucket.get_json("groups/0/progress.json")["state"] == "failed"


def test_the_losses_in_progress_are_the_means_of_their_steps(tmp_path):
    """Summed on the device, reduced once per interval: progress shows each interval's mean."""
    trainer = loop(tmp_path, run_spec(tmp_path, steps=10))
    seen = []
    real_loss = trainer.task.loss

    def loss(out, batch):
        value = real_loss(out, batch)
        if trainer.model.training:  # not the evals
            seen.append(value.item())
        return value

    trainer.task.loss = loss
    trainer.run()
    recorded = [h for h in trainer.progress.history if "taskLoss" in h]
    assert [h["step"] for h in recorded] == [10]  # one record per 10 steps (PROGRESS_EVERY)
    assert abs(recorded[0]["taskLoss"] - sum(seen) / 10) < 1e-5
    assert recorded[0]["loss"] == pytest.approx(recorded[0]["taskLoss"])  # one group: no term


def failing_final_publishes(trainer: Loop, steps: int, times: int) -> list[int]:
    """The final teacher publish fails `times` times (an outage at the end), then lands."""
    publish, tries = trainer.publisher.publish, []

    def flaky(step: int, data: bytes):
        if step == steps:
            tries.append(step)
            if len(tries) <= times:
                raise OSError("bucket unreachable")
        return publish(step, data)

    trainer.publisher.publish = flaky
    return tries


def test_the_final_publish_is_retried_until_it_lands(tmp_path):
    """D3: final.json points at the final teacher, never at an older one."""
    torch.set_num_threads(1)
    trainer = loop(tmp_path, run_spec(tmp_path, steps=5))
    tries = failing_final_publishes(trainer, 5, times=2)
    trainer.run()
    final = RunFolder(trainer.w.bucket).final(0)
    assert len(tries) == 3 and final.teacher["step"] == 5


def test_a_final_publish_that_never_lands_fails_the_group_without_final_json(tmp_path,
                                                                             monkeypatch):
    import pytest

    from codistill_trainer import loop as loop_module

    torch.set_num_threads(1)
    monkeypatch.setattr(loop_module, "FINAL_TIMEOUT_S", 1.5)
    trainer = loop(tmp_path, run_spec(tmp_path, steps=5))
    failing_final_publishes(trainer, 5, times=100)
    with pytest.raises(loop_module.FinalNotPublished, match="final teacher at step 5 did not"):
        trainer.run()
    folder = RunFolder(trainer.w.bucket)
    assert folder.final(0) is None
    assert trainer.w.bucket.get_json("groups/0/progress.json")["state"] == "failed"


def test_a_failed_save_is_retried_until_it_lands_or_a_newer_one_supersedes_it():
    from codistill_trainer.uploader import Uploader

    up, ran = Uploader(), []

    def flaky(tag: str, fails: int):
        def job():
            ran.append(tag)
            if ran.count(tag) <= fails:
                raise OSError("bucket unreachable")
        return job

    up.submit("state", flaky("s10", fails=2), retry=True)
    assert up.flush(timeout=10) and ran == ["s10"] * 3 and "state" not in up.errors
    up.submit("state", flaky("s20", fails=100), retry=True)
    time.sleep(0.2)  # failed once, waiting for its retry
    up.submit("state", flaky("s30", fails=0), retry=True)  # the next save supersedes it
    assert up.flush(timeout=10) and ran[3:] == ["s20", "s30"] and "state" not in up.errors
    up.submit("progress", flaky("p", fails=100))  # without retry: reported, not retried
    assert up.flush(timeout=10) and ran.count("p") == 1 and "OSError" in up.errors["progress"]
    up.close()


def test_a_group_resumed_at_its_last_step_still_reports_its_loss_and_eval(tmp_path):
    """D21: killed during finish() (its final state saved), then restarted."""
    torch.set_num_threads(1)
    killed = loop(tmp_path, run_spec(tmp_path, steps=5))
    for step in range(5):
        killed.step(step)
        killed.after_step(step + 1)
    killed.uploader.close()  # the state at step 5 is saved; final.json is not written
    resumed = loop(tmp_path, run_spec(tmp_path, steps=5))
    assert resumed.start == 5
    resumed.run()
    final = RunFolder(resumed.w.bucket).final(0)
    progress = RunFolder(resumed.w.bucket).progress(0)
    assert final.eval_loss is not None and final.eval_loss == killed.progress.eval["evalLoss"]
    assert progress.loss is not None and abs(progress.eval_loss - final.eval_loss) < 1e-5


def test_a_restarted_group_removes_what_a_kill_left_of_its_writes(tmp_path):
    """A kill during a local write leaves `<name>.tmp-<hex>`; the group's next start removes its
    own (not other groups'), before it writes anything."""
    run = run_spec(tmp_path, steps=4)
    bucket = Bucket((tmp_path / "bucket").as_uri())
    bucket.put("groups/0/progress.json.tmp-0badf00d", b"{half")
    bucket.put("groups/1/progress.json.tmp-0badf00d", b"{half")
    loop(tmp_path, run)
    assert bucket.ls("groups/0") == []
    assert bucket.ls("groups/1") == ["progress.json.tmp-0badf00d"]
