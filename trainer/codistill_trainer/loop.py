"""The training loop of one group's process: DDP inside the group, codistillation across groups.

Read `run()` top to bottom: one step is batch -> student forward -> (after burn-in) stale
teachers' forward on the same batch -> task loss + weight * distillation -> backward -> step.
Everything that touches the bucket (publishing, polling, saving state, progress) runs beside the
loop in background threads; the loop only hands over copies and swaps teachers at step
boundaries.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from codistill import failpoints
from codistill.runfolder import Final, Pointer, RunFolder
from codistill.spec import Codistillation, Distillation, Training
from codistill.storage import Bucket, StorageError

from . import dist, resume
from .distill import codistill_loss
from .exchange import state_channel, state_writer, teacher_channel, weights_blob
from .progress import ProgressMeter
from .shards import shard_of
from .tasks import resolve
from .tasks.base import Batch, Task
from .teachers import POINTER_READS_PER_S, Draw, PeerPoller, Teachers, poll_interval
from .uploader import Uploader

log = logging.getLogger(__name__)
PROGRESS_EVERY = 10  # steps between progress records


class NonFiniteLoss(RuntimeError):
    """Stop before the optimizer step rather than write NaNs into the weights."""


class FinalNotPublished(RuntimeError):
    """The final teacher or state did not reach the bucket: no final.json from an older one."""


FINAL_TIMEOUT_S = 300.0  # how long the final publishes are retried before the group fails
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}  # training.precision -> teachers' dtype


@dataclass(frozen=True)
class Member:
    """Who this process is: its group, its rank in the group's DDP world, and the bucket."""

    run: Codistillation
    group: int
    rank: int
    world: int
    bucket: Bucket
    device: torch.device


def build_optimizer(
    model: nn.Module, cfg: Training
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    o = cfg.optimizer
    params = model.parameters()
    if o.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
        )
    elif o.name == "adam":
        opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        done = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
        if o.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        if o.schedule == "linear":
            return max(0.0, 1 - done)
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def to_device(batch: Batch, device: torch.device) -> Batch:
    def move(x: Any) -> Any:
        return tuple(move(t) for t in x) if isinstance(x, tuple) else x.to(device, non_blocking=True)

    return Batch(move(batch.inputs), move(batch.targets))


def distills(step: int, d: Distillation) -> bool:
    """Whether step `step` adds the distillation term: after burn-in, and only with a weight.

    The one place burn-in is decided; before it the teachers do not even run."""
    return step >= d.burn_in_steps and d.weight > 0


def evaluate(task: Task, model: nn.Module, batches: list[Batch], device: torch.device) -> tuple[float, float]:
    """(eval loss, accuracy); each rank evaluates its slice of the fixed eval set."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.inference_mode():
        for batch in batches:
            batch = to_device(batch, device)
            out = task.forward(model, batch)
            pred = task.logits(out).argmax(-1)
            sums += torch.tensor([task.loss(out, batch).item(), 1.0, 0.0], dtype=torch.float64)
            sums[2] += (pred == task.targets(batch)).float().mean().item()
    model.train(was_training)
    dist.all_reduce(sums)  # every rank evaluated its own slice: the group's result is the sum
    return float(sums[0] / max(sums[1], 1)), float(sums[2] / max(sums[1], 1))


class Loop:
    """State shared by the loop's helpers; `run()` is the loop itself."""

    def __init__(self, w: Member):
        self.w, self.spec = w, w.run.spec
        self.folder = RunFolder(w.bucket)
        self.task = resolve(self.spec.task.name, self.spec.task.args)
        torch.manual_seed(self.spec.training.seed * 1000 + w.group)  # groups start apart
        self.model = self.task.model().to(w.device)
        self.opt, self.sched = build_optimizer(self.model, self.spec.training)
        self.uploader = Uploader()
        self.states = state_channel(w.bucket, w.group)
        self.publisher = teacher_channel(w.bucket, w.group)
        self.progress = ProgressMeter(w.group, self.spec.training.steps)
        self.losses = torch.zeros(4, device=w.device)  # sums since the last check_losses
        self.submitted = -1  # last step whose weights were handed to the uploader
        self.published: Pointer | None = None  # the last publish that landed
        self.start = self._resume()
        self.saved = self.start if self.start else -1  # resumed: that state is in the bucket
        self._tidy()
        self.progress.restarts = self._restarts()
        self.ddp = DistributedDataParallel(self.model) if w.world > 1 else self.model
        shard, shards = shard_of(
            w.group, self.spec.groups, w.rank, w.world, self.spec.training.data_sharding
        )
        self.data = self.task.train_data(shard, shards)
        log.info("group %d rank %d of %d: shard %d of %d shards, starting at step %d",
                 w.group, w.rank, w.world, shard, shards, self.start)
        batches = self.task.eval_data(self.spec.training.batch_size, self.spec.training.eval_batches)
        self.eval_batches = batches[w.rank :: w.world]
        self.teachers = self._teachers()

    def _resume(self) -> int:
        saved = resume.load_latest(self.states)
        if saved is None:
            return 0
        step = resume.restore(saved, self.model, self.opt, self.sched, self.w.rank)
        self.progress.restore(saved.get("history", []))
        self.progress.resumed_from = self.progress.step = step
        log.info("group %d rank %d resumed from step %d", self.w.group, self.w.rank, step)
        return step

    def _tidy(self) -> None:
        """Remove what a kill left of this group's own writes (a progress.json in its temporary
        file), so a group killed again and again cannot fill a local disk with them (D10)."""
        if self.w.rank != 0:
            return
        try:
            self.folder.remove_temporaries(self.w.group)
        except StorageError as e:  # harmless: they are only litter; tried again next start
            log.warning("group %d: temporary files not removed (%s)", self.w.group, e)

    def _restarts(self) -> int:
        """Counted by the trainer itself, from its own last progress file, so a restart shows in
        status however briefly the job was seen restarting (or whether it was seen at all)."""
        if self.w.rank != 0:
            return 0
        try:
            previous = self.folder.progress(self.w.group)
        except StorageError as e:
            log.warning("group %d: previous progress not read (%s); restarts counted from 0",
                        self.w.group, e)
            return 0
        return 0 if previous is None else previous.restarts + 1

    def _teachers(self) -> Teachers | None:
        d = self.spec.distillation
        peers = tuple(g for g in range(self.spec.groups) if g != self.w.group)
        if not peers:
            return None
        draw = Draw(peers, d.teachers, self.spec.training.seed, d.reload_every_steps)
        poller = None
        if self.w.rank == 0:  # the other ranks get their teachers from rank 0 (teachers.py)
            asked = self.spec.distillation.poll_interval_seconds
            interval = poll_interval(asked, self.spec.groups, draw.most())
            if interval > asked:
                log.info("group %d: polling peers every %.1f s, not %.1f s: %d groups polling "
                         "faster would read more than %d pointers a second", self.w.group,
                         interval, asked, self.spec.groups, POINTER_READS_PER_S)
            poller = PeerPoller(
                self.w.bucket, peers, interval,
                max_step=self.spec.training.steps,  # a peer's pointer beyond it is refused (D9)
            )
            poller.want(draw.ahead(self.start))  # before its thread's first poll
            poller.start()
        return Teachers(self.task, draw, poller, d.max_staleness_steps,
                        self.w.device, PRECISIONS[self.spec.training.precision])

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast for the forward passes when training.precision asks for it; the
        losses' softmaxes and reductions stay float32 (autocast's own rule for them)."""
        bf16 = self.spec.training.precision == "bf16"
        return torch.autocast(self.w.device.type, dtype=torch.bfloat16, enabled=bf16)

    def step(self, step: int) -> None:
        d, t = self.spec.distillation, self.spec.training
        batch = to_device(self.data.batch(step, t.batch_size, t.seed), self.w.device)
        peers: list[int] = []
        if self.teachers and distills(step, d):
            # The teachers see the student's own batch; every rank of the group holds the same
            # teachers (this period's draw), so the ranks stay in step.
            peers = self.teachers.usable(step)
        with self.autocast():
            out = self.task.forward(self.ddp, batch)
            task_loss = self.task.loss(out, batch)
            teacher_logits = self.teachers.logits(batch, peers) if peers else []
            loss, term = codistill_loss(task_loss, self.task.logits(out), teacher_logits,
                                        weight=d.weight, temperature=d.temperature, kind=d.loss)
        stale = max((step - self.teachers.steps[p] for p in peers), default=None)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients inside the group here
        if t.optimizer.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), t.optimizer.grad_clip)
        self.opt.step()
        self.sched.step()
        # The losses stay on the device: adding them up needs no host synchronisation, so the
        # step never waits for the device. They are reduced and checked at the next boundary.
        zero = loss.new_zeros((), dtype=torch.float32)
        used = zero + 1.0 if term is not None else zero  # on the device, as the losses are
        self.losses += torch.stack([loss.detach().float(), task_loss.detach().float(),
                                    term.detach().float() if term is not None else zero, used])
        self.progress.add(step + 1, t.batch_size * self.w.world, staleness=stale)

    def check_losses(self, done: int) -> None:
        """Reduce the losses summed since the last check over the group (one all-reduce and one
        host synchronisation per interval, not per step) into progress, and stop if they are not
        finite. Called before anything of the model leaves the process (publish, eval, save,
        progress): a NaN in the weights is never published or saved, and the group resumes from
        the last good state in the bucket."""
        total, task_sum, term_sum, used = (dist.all_reduce(self.losses) / dist.world()).tolist()
        self.losses.zero_()
        if not math.isfinite(total):
            raise NonFiniteLoss(
                f"group {self.w.group}: loss is {total} in the steps up to {done}; stopping "
                "before these weights are published or saved (the last state is kept in the "
                "bucket)")
        self.progress.add_losses(loss=total, taskLoss=task_sum,
                                 distillLoss=term_sum if used else None)

    def after_step(self, done: int) -> None:
        """Periodic work at the boundary after `done` steps.

        Every rank runs this in the same order, because check_losses (one SUM all-reduce),
        refresh (two MIN all-reduces), evaluate (one all-reduce) and save (an all-gather of RNG
        states) are collectives. The losses are checked first, at every boundary that does
        anything, so weights from a non-finite step never leave the process. Publishing comes
        before refreshing so a peer's reload at this same step can already see this step's
        weights; progress.json is written last so it shows this step's eval and publish.
        """
        t, d = self.spec.training, self.spec.distillation
        due = [d.exchange_every_steps, d.reload_every_steps, t.eval_every_steps, PROGRESS_EVERY,
               t.checkpoint_every_steps]
        if done == t.steps or any(done % k == 0 for k in due):
            self.check_losses(done)  # a collective, at the same boundaries on every rank
        if self.teachers and done % d.exchange_every_steps == 0:
            self.publish(done)
        if self.teachers and done % d.reload_every_steps == 0 and done < t.steps:
            self.teachers.refresh(done)  # for the period from `done` on: none after the last step
        if done % t.eval_every_steps == 0 or done == t.steps:
            loss, acc = evaluate(self.task, self.model, self.eval_batches, self.w.device)
            self.progress.record_eval(done, loss, acc)
        recording = done % PROGRESS_EVERY == 0 or done == t.steps
        if recording:  # before the save, so a resumed group has this record in its history
            self.progress.record()
        if done % t.checkpoint_every_steps == 0 or done == t.steps:
            self.save(done)
        if recording:
            self.report_progress()

    def publish(self, done: int) -> None:
        if self.w.rank != 0:
            return
        self.submitted = done
        weights = resume.cpu_copy(self.model.state_dict())  # at this boundary, off the GPU

        def job() -> None:
            self.published = self.publisher.publish(done, weights_blob(weights, done).write)
            self.progress.last_published = done

        self.uploader.submit("teacher", job, retry=True)

    def save(self, done: int) -> None:
        rng = resume.rng_states()  # collective
        if self.w.rank != 0:
            return
        snap = resume.snapshot(self.model, self.opt, self.sched, done, self.progress.history, rng)

        def job() -> None:
            self.states.publish(done, state_writer(snap))
            self.saved = done

        self.uploader.submit("state", job, retry=True)

    def _check_final(self, steps: int) -> None:
        """final.json is written only over the final teacher and state, both landed: else the
        report would evaluate an older model, and a restart could not resume from the end."""
        landed = {"teacher": self.published.step if self.published else -1, "state": self.saved}
        lost = {name: self.uploader.errors.get(name, "not written") for name, step in
                landed.items() if step != steps}
        if lost:
            self.progress.state = "failed"
            self.report_progress()
            self.uploader.close(timeout=2)  # the "failed" record; the retries are given up
            why = "; ".join(f"{name}: {error}" for name, error in lost.items())
            raise FinalNotPublished(
                f"group {self.w.group}: the final {' and '.join(lost)} at step {steps} did not "
                f"reach the bucket in {FINAL_TIMEOUT_S:.0f} s ({why}); final.json not written, "
                "the group fails and resumes from its last state when restarted")

    def warnings(self) -> list[str]:
        found = list(self.uploader.errors.values())
        if self.teachers:
            found += self.teachers.all_warnings()
        return found

    def report_progress(self) -> None:
        if self.w.rank != 0:
            return
        teachers = self.teachers.steps if self.teachers else {}
        stale = self.teachers.staleness(self.progress.step) if self.teachers else {}
        doc = self.progress.snapshot(dict(teachers), stale, self.warnings())
        self.uploader.submit("progress", lambda: self.folder.write_progress(doc))

    def run(self) -> None:
        self.progress.state = "training"
        self.report_progress()
        if self.teachers and self.start:
            self.teachers.refresh(self.start)
        self.model.train()
        try:
            for step in range(self.start, self.spec.training.steps):
                self.step(step)
                self.after_step(step + 1)
        except Exception:
            self.progress.state = "failed"  # say so where status and the operator look
            self.report_progress()
            self.uploader.close(timeout=30)
            raise
        finally:
            if self.teachers:
                self.teachers.stop()
        self.finish()

    def finish(self) -> None:
        """Publish the final teacher and state, mark the group finished, maybe write the report."""
        steps = self.spec.training.steps
        if self.w.rank == 0:
            if self.submitted != steps:  # groups: 1 publishes only its final model (for the report)
                self.publish(steps)
            # Said before the wait, so a log that ends here shows what the group is waiting for.
            log.info("group %d: trained %d steps; publishing the final teacher and state "
                     "(retried for up to %.0f s)", self.w.group, steps, FINAL_TIMEOUT_S)
            self.uploader.flush(FINAL_TIMEOUT_S)  # failed publishes are retried meanwhile
            self._check_final(steps)
            self.progress.state = "finished"
            self.report_progress()
            self.uploader.close()
            failpoints.reach(failpoints.BEFORE_FINAL, str(self.w.group))
            teacher = asdict(self.published) if self.published else None
            self.folder.write_final(self.w.group, Final(
                step=steps, eval_loss=self.progress.eval.get("evalLoss"),
                eval_accuracy=self.progress.eval.get("evalAccuracy"), teacher=teacher,
            ))
        else:
            self.uploader.close()
