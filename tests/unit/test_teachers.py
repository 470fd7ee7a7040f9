"""Stale peers: polled in the background, verified, swapped in, skipped when too stale."""

import threading

import torch
from torch import nn

from codistill.storage import Bucket
from codistill_trainer.exchange import teacher_channel, weights_to_bytes
from codistill_trainer.shards import bounds, generator, shard_of
from codistill_trainer.teachers import PeerPoller, Teachers, sample
from codistill_trainer.uploader import Uploader


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


class TinyTask:
    """Just enough of a Task for Teachers: a model factory, forward and logits."""

    def model(self):
        return Linear()

    def forward(self, model, batch):
        return model(batch.inputs)

    def logits(self, out):
        return out


def publish(bucket, group, step, value):
    m = Linear()
    nn.init.constant_(m.fc.weight, value)
    teacher_channel(bucket, group).publish(step, weights_to_bytes(m.state_dict(), step))


def test_poller_fetches_newest_and_keeps_last_good(tmp_path):
    bucket = Bucket(tmp_path.as_uri())
    poller = PeerPoller(bucket, [1, 2], interval=0.05)
    poller.poll_once()
    assert poller.newest() == {1: -1, 2: -1}  # nobody published yet: no teacher, no error
    publish(bucket, 1, 50, 1.0)
    poller.poll_once()
    assert poller.newest()[1] == 50
    # peer 1 publishes a blob that gets corrupted: the poller keeps version 50
    publish(bucket, 1, 100, 2.0)
    ch = teacher_channel(bucket, 1)
    bucket.put(f"{ch.folder}/{ch.latest().key}", b"torn")
    poller.poll_once()
    assert poller.newest()[1] == 50
    assert "keeping last good teacher" in poller.warnings[1]


def test_teachers_swap_and_skip_stale(tmp_path):
    bucket = Bucket(tmp_path.as_uri())
    publish(bucket, 1, 50, 0.5)
    poller = PeerPoller(bucket, [1])
    poller.poll_once()
    teachers = Teachers(TinyTask(), poller, max_staleness=100)
    teachers.refresh()
    assert teachers.steps == {1: 50}
    model = teachers.models[1]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.allclose(model.fc.weight, torch.full((2, 3), 0.5))
    assert teachers.usable(120) == [1] and teachers.staleness(120) == {1: 70}
    assert teachers.usable(151) == [] and "stale" in teachers.warnings[1]


def test_poller_thread_runs_beside_caller(tmp_path):
    bucket = Bucket(tmp_path.as_uri())
    poller = PeerPoller(bucket, [0], interval=0.02).start()
    try:
        publish(bucket, 0, 10, 1.0)
        for _ in range(200):
            if poller.newest()[0] == 10:
                break
            threading.Event().wait(0.02)
        assert poller.newest()[0] == 10
    finally:
        poller.stop()


def test_sample_is_deterministic_per_step():
    peers = [0, 2, 3, 5]
    assert sample(peers, "all", 0, 7) == peers
    a, b = sample(peers, 2, 0, 7), sample(peers, 2, 0, 7)
    assert a == b and len(a) == 2 and set(a) <= set(peers)
    assert len({tuple(sample(peers, 2, 0, s)) for s in range(30)}) > 1


def test_uploader_coalesces_to_latest_and_survives_errors():
    gate, ran = threading.Event(), []
    up = Uploader()
    up.submit("a", gate.wait)  # blocks the worker thread
    for i in range(5):
        up.submit("x", lambda i=i: ran.append(i))
    up.submit("boom", lambda: 1 / 0)
    gate.set()
    assert up.flush(timeout=5)
    assert ran == [4]  # only the latest version of "x" ran
    assert "ZeroDivisionError" in up.errors["boom"]
    up.close()


def test_shards_are_disjoint_and_cover():
    n, seen = 103, []
    for g in range(2):
        for r in range(2):
            i, k = shard_of(g, 2, r, 2, "disjoint")
            lo, hi = bounds(n, i, k)
            seen += list(range(lo, hi))
    assert sorted(seen) == list(range(n))
    assert shard_of(1, 2, 1, 2, "shared") == shard_of(0, 2, 1, 2, "shared") == (1, 2)
    g1, g2 = generator(0, 1, 5), generator(0, 1, 5)
    assert torch.equal(torch.randint(0, 1000, (5,), generator=g1), torch.randint(0, 1000, (5,), generator=g2))
