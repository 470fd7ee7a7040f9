"""Stale peers: polled in the background, verified, swapped in, skipped when too stale."""

import threading

import torch
from torch import nn

from codistill.storage import Bucket
from codistill_trainer.exchange import teacher_channel, weights_to_bytes
from codistill_trainer.shards import bounds, generator, shard_of
from codistill_trainer.teachers import (
    POINTER_READS_PER_S,
    Draw,
    PeerPoller,
    Teachers,
    poll_interval,
)
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


def teacher_at_50(tmp_path, max_staleness: int) -> tuple[Bucket, PeerPoller, Teachers]:
    """Peer 1 published weights of 0.5 at step 50, polled and loaded as the teacher."""
    bucket = Bucket(tmp_path.as_uri())
    publish(bucket, 1, 50, 0.5)
    poller = PeerPoller(bucket, [1])
    poller.poll_once()
    teachers = Teachers(TinyTask(), Draw((1,)), poller, max_staleness=max_staleness)
    teachers.refresh(0)
    return bucket, poller, teachers


def test_teachers_swap_and_skip_stale(tmp_path):
    bucket, poller, teachers = teacher_at_50(tmp_path, max_staleness=100)
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


def test_a_draw_is_the_same_for_a_whole_reload_period_and_changes_between_them():
    draw = Draw((0, 2, 3, 5), k=2, seed=0, period=50)
    assert Draw((0, 2, 3, 5)).at(7) == [0, 2, 3, 5]  # `all`
    assert draw.at(50) == draw.at(99) == Draw((0, 2, 3, 5), k=2, seed=0, period=50).at(60)
    assert len(draw.at(50)) == 2 and set(draw.at(50)) <= {0, 2, 3, 5}
    assert len({tuple(draw.at(50 * r)) for r in range(30)}) > 1
    assert draw.ahead(50) == {*draw.at(50), *draw.at(100)}


def test_a_drawn_group_fetches_and_holds_only_the_peers_of_this_period_and_the_next(tmp_path):
    bucket = Bucket(tmp_path.as_uri())
    for peer in (1, 2, 3, 4):
        publish(bucket, peer, 50, float(peer))
    draw = Draw((1, 2, 3, 4), k=1, seed=0, period=50)
    at = next(s for s in range(0, 5000, 50) if draw.at(s) != draw.at(s + 50))  # a change ahead
    poller = PeerPoller(bucket, [1, 2, 3, 4])
    poller.want(draw.ahead(at))
    poller.poll_once()
    assert set(poller.newest()) == {1, 2, 3, 4}
    assert {p for p, s in poller.newest().items() if s == 50} == draw.ahead(at)  # 2 of 4 fetched
    teachers = Teachers(TinyTask(), draw, poller, max_staleness=1000)
    teachers.refresh(at)
    assert set(teachers.models) == set(draw.at(at))
    (peer,) = draw.at(at)
    assert teachers.models[peer].fc.weight.sum().item() == 6 * peer  # that peer's own weights
    teachers.refresh(at + 50)  # the next period: its peer was fetched ahead, the old one let go
    assert set(teachers.models) == set(draw.at(at + 50)) == set(teachers.usable(at + 50))
    assert {p for p, s in poller.newest().items() if s == 50} <= draw.ahead(at + 50)


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


def publish_tensors(bucket, group, step, tensors):
    """Publish hostile but well-formed weights (valid safetensors, valid pointer)."""
    teacher_channel(bucket, group).publish(step, weights_to_bytes(tensors, step))


def test_nonfinite_or_wrong_dtype_teacher_refused_last_good_kept(tmp_path):
    bucket, poller, teachers = teacher_at_50(tmp_path, max_staleness=1000)
    assert teachers.steps == {1: 50}
    good = {k: v.clone() for k, v in Linear().state_dict().items()}
    hostile = {
        100: {"fc.weight": torch.full((2, 3), float("nan")), "fc.bias": torch.zeros(2)},
        150: {"fc.weight": torch.ones(2, 3), "fc.bias": torch.tensor([float("inf"), 0.0])},
        200: {k: v.to(torch.float64) for k, v in good.items()},
        250: {k: v.to(torch.int8) for k, v in good.items()},
    }
    for step, tensors in hostile.items():
        publish_tensors(bucket, 1, step, tensors)
        poller.poll_once()
        assert "keeping last good teacher" in poller.warnings[1], step
        teachers.refresh(0)
        assert teachers.steps == {1: 50}, step
        weight = teachers.models[1].fc.weight
        assert weight.dtype == torch.float32 and torch.allclose(weight, torch.full((2, 3), 0.5))
    assert "non-finite" in poller.warnings[1] or "float" in poller.warnings[1]
    x = torch.randn(4, 3)
    assert torch.isfinite(teachers.logits(type("B", (), {"inputs": x})(), [1])[0]).all()
    publish(bucket, 1, 300, 2.0)  # a genuine publish is swapped in and clears the warning
    poller.poll_once()
    teachers.refresh(0)
    assert teachers.steps == {1: 300} and 1 not in poller.warnings


def test_teachers_load_refuses_bad_weights_the_poller_let_through(tmp_path):
    """Even if a version got past the poller's checks (no layout known yet), _load refuses it
    before touching the loaded teacher."""
    bucket, poller, teachers = teacher_at_50(tmp_path, max_staleness=1000)
    poller.expected = None
    good = Linear().state_dict()
    publish_tensors(bucket, 1, 100, {k: v.to(torch.float64) for k, v in good.items()})
    poller.poll_once()
    assert poller.newest()[1] == 100  # let through: only non-finite values are known bad here
    teachers.refresh(0)
    assert teachers.steps == {1: 50} and "torch.float64" in teachers.warnings[1]
    assert torch.allclose(teachers.models[1].fc.weight, torch.full((2, 3), 0.5))
    teachers.refresh(0)  # not retried at every reload boundary
    assert teachers.steps == {1: 50}


def test_pointer_step_out_of_range_refused(tmp_path):
    bucket = Bucket(tmp_path.as_uri())
    publish(bucket, 1, 50, 0.5)
    poller = PeerPoller(bucket, [1], max_step=1000)
    poller.poll_once()
    teachers = Teachers(TinyTask(), Draw((1,)), poller, max_staleness=100)
    teachers.refresh(0)
    assert teachers.steps == {1: 50}
    for step in (10**19, 10**15, 1001, -5):  # past int64, huge, past training.steps, negative
        publish(bucket, 1, step, 9.0)
        poller.poll_once()
        assert poller.newest()[1] == 50, step
        assert "keeping last good teacher" in poller.warnings[1], step
        assert step < 0 or "outside [0, 1000]" in poller.warnings[1], step  # (-5: may be malformed)
        teachers.refresh(0)  # no int64 overflow in the all-reduce
        assert teachers.steps == {1: 50}, step
    publish(bucket, 1, 1000, 1.0)  # genuine publishes are still swapped in, not pinned out
    poller.poll_once()
    teachers.refresh(0)
    assert teachers.steps == {1: 1000} and 1 not in poller.warnings
    assert teachers.usable(1000) == [1]


def test_pointer_step_past_int64_refused_without_max_step(tmp_path):
    bucket = Bucket(tmp_path.as_uri())
    publish(bucket, 1, 2**63, 1.0)
    poller = PeerPoller(bucket, [1])
    poller.poll_once()
    assert poller.newest() == {1: -1} and "outside" in poller.warnings[1]
    # would raise OverflowError
    Teachers(TinyTask(), Draw((1,)), poller, max_staleness=100).refresh(0)


def test_bf16_teachers_take_half_the_memory_and_accept_fp32_weights(tmp_path):
    """training.precision bf16: peers publish float32 (checked against the float32 layout), the
    teacher is held in bfloat16."""
    bucket = Bucket(tmp_path.as_uri())
    publish(bucket, 1, 50, 0.5)
    held = {}
    for dtype in (torch.float32, torch.bfloat16):
        poller = PeerPoller(bucket, [1])
        poller.poll_once()
        teachers = Teachers(TinyTask(), Draw((1,)), poller, max_staleness=100, dtype=dtype)
        teachers.refresh(0)
        assert teachers.steps == {1: 50} and 1 not in teachers.warnings
        model = teachers.models[1]
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert torch.equal(model.fc.weight.float(), torch.full((2, 3), 0.5))
        held[dtype] = sum(p.numel() * p.element_size() for p in model.parameters())
    assert held[torch.bfloat16] * 2 == held[torch.float32]


def _rank_refreshes(rank: int, root: str, seen: "torch.multiprocessing.SimpleQueue") -> None:
    """One rank of a group of 2 (gloo): only rank 0 polls the bucket; both refresh."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank,
                            world_size=2)
    try:
        bucket = Bucket(f"file://{root}/bucket")
        poller = PeerPoller(bucket, [1]) if rank == 0 else None
        teachers = Teachers(TinyTask(), Draw((1,)), poller, max_staleness=100)
        loaded = []
        for step, value in ((50, 0.5), (100, float("nan"))):  # the second is refused
            if rank == 0:
                publish(bucket, 1, step, value)
                poller.poll_once()
            teachers.refresh(0)
            weight = teachers.models[1].fc.weight
            loaded.append((teachers.steps[1], weight.sum().item()))
        seen.put((rank, loaded, sorted(teachers.all_warnings())))
    finally:
        dist.destroy_process_group()


def test_rank_0_alone_reads_the_bucket_and_sends_every_rank_the_same_teacher(tmp_path):
    """Real torch.distributed processes: rank 1 has no poller (no bucket reads) and gets the
    weights rank 0 verified; a version rank 0's poller refused reaches neither."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    seen = ctx.SimpleQueue()
    mp.start_processes(_rank_refreshes, args=(str(tmp_path), seen), nprocs=2, start_method="spawn")
    results = dict((rank, (loaded, warnings)) for rank, loaded, warnings in
                   (seen.get() for _ in range(2)))
    assert results[0][0] == results[1][0] == [(50, 3.0), (50, 3.0)]  # 2x3 weights of 0.5
    assert any("non-finite" in w for w in results[0][1]) and results[1][1] == []


def test_poll_interval_keeps_the_runs_pointer_reads_within_one_s3_prefix():
    assert poll_interval(1.0, 2, 1) == 1.0 and poll_interval(0.05, 8, 7) == 0.05  # as asked
    for groups in (54, 64, 128, 512):
        interval = poll_interval(1.0, groups, groups - 1)
        assert groups * (groups - 1) / interval <= POINTER_READS_PER_S
    assert poll_interval(1.0, 64, 63) > 1.0 and poll_interval(10.0, 64, 63) == 10.0
    # `teachers: 2` polls at most 4 peers: 512 groups stay at 1 s
    draw = Draw(tuple(range(1, 512)), k=2)
    assert draw.most() == 4 and poll_interval(1.0, 512, draw.most()) == 1.0
    assert Draw((1, 2, 3), k=2).most() == 3 and Draw((1, 2, 3)).most() == 3
