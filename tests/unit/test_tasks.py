"""The built-in tasks on the tiny fixture data, and resolve() for built-in and user tasks."""

from __future__ import annotations

import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from codistill import names
from codistill.spec import SpecError
from codistill_trainer import datasets
from codistill_trainer.tasks import Task, resolve
from codistill_trainer.tasks.ctr import RowShard, Table
from codistill_trainer.tasks.lm import SampledText, TextShard
from codistill_trainer.tasks.ngram import NgramModel
from tests.support.datafixtures import WORDS, make_tiny_data

SMALL = {
    "lm": {"seq_len": 16, "embed": 16, "hidden": 32},
    "ctr": {"embed": 4, "hidden": 16},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on 2 shared cores: a second intra-op thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("data"))


CASES = [("lm", {}), ("lm", {"ngram": 5}), ("ctr", {})]  # (task, args): each kind of train data


def make(name: str, tiny: Path, **args: object) -> Task:
    return resolve(name, {**SMALL[name], "data_dir": str(tiny), **args})


def same(a: Any, b: Any) -> bool:
    """Equal batches (tensors, or tuples and lists of them, nested)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))


# --- shards ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3])
def test_lm_shards_partition_the_train_text(tiny: Path, shards: int) -> None:
    task = make("lm", tiny)
    parts = [task.train_data(i, shards) for i in range(shards)]
    assert torch.equal(torch.cat([p.ids for p in parts]), task.splits[0])
    starts = [p.ids.storage_offset() for p in parts]
    assert starts == sorted(starts) and len(set(starts)) == shards


def test_lm_windows_stay_inside_their_shard() -> None:
    """With ids equal to positions, a window's ids are the positions it reads."""
    lo, hi, seq_len = 1000, 1100, 16
    shard = TextShard(torch.arange(lo, hi), shard=2, seq_len=seq_len)
    for step in range(50):
        batch = shard.batch(step, 32, seed=7)
        assert batch.inputs.min() >= lo and batch.targets.max() < hi
        assert torch.equal(batch.targets, batch.inputs + 1)
        assert torch.equal(batch.inputs[:, 1:], batch.inputs[:, :-1] + 1)


def test_lm_eval_text_is_disjoint_from_train(tiny: Path) -> None:
    task = make("lm", tiny)
    train, test = task.splits
    reviews = datasets.read_reviews(tiny)
    assert len(train) + len(test) == sum(len(r) + 1 for r in reviews)
    assert 0.02 < len(test) / (len(train) + len(test)) < 0.1


def test_ctr_shards_partition_the_train_rows(tiny: Path) -> None:
    task = make("ctr", tiny)
    train, test, _ = task.splits
    parts = [task.train_data(i, 3).rows for i in range(3)]
    for column in range(3):
        assert torch.equal(torch.cat([p[column] for p in parts]), train[column])
    assert len(test.labels) == round(0.2 * (len(train.labels) + len(test.labels)))


def test_ctr_epoch_visits_each_row_once() -> None:
    """With labels equal to row ids: one epoch draws every row at most once, then reshuffles."""
    n, batch_size = 50, 8
    rows = Table(torch.zeros(n, 1, dtype=torch.long), torch.zeros(n, 1), torch.arange(n).float())
    shard = RowShard(rows, shard=1)
    per_epoch = n // batch_size
    epochs = [
        torch.cat([shard.batch(e * per_epoch + i, batch_size, 0).targets for i in range(per_epoch)])
        for e in range(2)
    ]
    for ids in epochs:
        assert len(ids.unique()) == per_epoch * batch_size
    assert not torch.equal(epochs[0], epochs[1])


def test_ctr_normalizes_with_train_statistics(tiny: Path) -> None:
    train, test, _ = make("ctr", tiny).splits
    assert torch.allclose(train.nums.mean(0), torch.zeros(6), atol=1e-5)
    assert torch.allclose(train.nums.std(0), torch.ones(6), atol=1e-5)
    assert not torch.allclose(test.nums.mean(0), torch.zeros(6), atol=1e-5)


# --- determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "args"), CASES, ids=["lm", "lm-ngram", "ctr"])
def test_batch_is_a_pure_function_of_step(tiny: Path, name: str, args: dict) -> None:
    """Two fresh tasks (two processes, or one resumed after a kill) see the same batches."""
    first, second = (make(name, tiny, **args).train_data(1, 2) for _ in range(2))
    steps = [0, 5, 40, 5, 0, 41]  # out of order, across an epoch of the ctr shard
    batches = [first.batch(s, 16, seed=3) for s in steps]
    assert all(same(b, second.batch(s, 16, seed=3)) for s, b in zip(steps, batches))
    assert same(batches[1], batches[3]) and same(batches[0], batches[4])
    assert not same(batches[0], batches[1])
    assert not same(batches[0], first.batch(0, 16, seed=4))


@pytest.mark.parametrize("name", ["lm", "ctr"])
def test_eval_data_is_identical_across_instances(tiny: Path, name: str) -> None:
    a, b = make(name, tiny).eval_data(8, 3), make(name, tiny).eval_data(8, 3)
    assert len(a) == 3 and same(a, b)


# --- models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lm_shapes(tiny: Path, cell: str) -> None:
    task = make("lm", tiny, cell=cell)
    batch = task.train_data(0, 1).batch(0, 4, seed=0)
    output = task.forward(task.model(), batch)
    vocab = len(datasets.read_vocab(tiny)) + 1
    assert output.shape == (4, 16, vocab)
    assert task.logits(output).shape == (4 * 16, vocab)
    assert task.targets(batch).shape == (4 * 16,)
    assert task.loss(output, batch).shape == ()


def test_ctr_logits_are_a_two_class_view_of_one_logit(tiny: Path) -> None:
    task = make("ctr", tiny)
    batch = task.train_data(0, 1).batch(0, 5, seed=0)
    z = task.forward(task.model(), batch)
    assert z.shape == (5,)
    logits = task.logits(z)
    assert logits.shape == (5, 2) and torch.equal(logits[:, 0], torch.zeros(5))
    assert torch.allclose(logits.softmax(-1)[:, 1], torch.sigmoid(z))
    assert set(task.targets(batch).tolist()) <= {0, 1}


@pytest.mark.parametrize(("name", "args"), CASES, ids=["lm", "lm-ngram", "ctr"])
def test_training_lowers_the_eval_loss(tiny: Path, name: str, args: dict) -> None:
    """With `ngram`, eval is still on the held-out real reviews: sampled text must teach them."""
    task = make(name, tiny, **args)
    torch.manual_seed(0)
    model, data, evals = task.model(), task.train_data(0, 1), task.eval_data(16, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss() -> float:
        with torch.no_grad():
            return sum(task.loss(task.forward(model, b), b).item() for b in evals) / len(evals)

    before = eval_loss()
    for step in range(60):
        batch = data.batch(step, 16, seed=0)
        loss = task.loss(task.forward(model, batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert eval_loss() < 0.6 * before


# --- lm on sampled text (ngram) -------------------------------------------------------------


def text_of(task: Task, ids: torch.Tensor) -> str:
    return "".join(task.chars[i - 1] if i else "\0" for i in ids.reshape(-1).tolist())


def sample(tiny: Path, order: int) -> tuple[Task, torch.Tensor]:
    """A task of order `order` and 32 sampled windows of 64 characters."""
    task = make("lm", tiny, ngram=order, seq_len=64)
    return task, task.train_data(0, 1).batch(0, 32, seed=0).inputs


def test_ngram_continues_a_cycle_exactly() -> None:
    """Text 1..7 repeated: every context has one follower, so every stream continues the cycle
    (this checks the context keys and the shift that brings each new character in)."""
    model = NgramModel(torch.arange(1, 8).repeat(10).short(), order=5, vocab=8)
    out = model.sample(torch.Generator().manual_seed(0), rows=16, length=40).long()
    assert torch.equal(out[:, 1:], out[:, :-1] % 7 + 1)
    assert len(out[:, 0].unique()) > 1  # streams start at different places


def test_ngram_backs_off_from_an_unseen_context() -> None:
    """Text 1 2 3 4: nothing ever follows 4, so after a 4 the unigram of followers {2, 3, 4}."""
    model = NgramModel(torch.tensor([1, 2, 3, 4], dtype=torch.int16), order=2, vocab=5)
    out = model.sample(torch.Generator().manual_seed(1), rows=64, length=12).long()
    prev, nxt = out[:, :-1].reshape(-1), out[:, 1:].reshape(-1)
    assert torch.equal(nxt[prev != 4], prev[prev != 4] + 1)
    assert set(nxt[prev == 4].tolist()) == {2, 3, 4}


def test_ngram_is_off_by_default_and_keeps_the_eval_data(tiny: Path) -> None:
    corpus, sampled = make("lm", tiny), make("lm", tiny, ngram=4)
    assert isinstance(corpus.train_data(0, 1), TextShard)
    assert isinstance(sampled.train_data(0, 1), SampledText)
    assert same(corpus.eval_data(8, 3), sampled.eval_data(8, 3))


def test_ngram_shards_get_different_streams(tiny: Path) -> None:
    task = make("lm", tiny, ngram=5)
    data = [task.train_data(i, 3) for i in range(3)]
    for step in range(5):
        rows = torch.cat([d.batch(step, 8, seed=0).inputs for d in data])
        assert len(rows.unique(dim=0)) == len(rows)  # no window shared by two shards (or rows)


def test_ngram_targets_are_the_next_characters(tiny: Path) -> None:
    batch = make("lm", tiny, ngram=3).train_data(0, 1).batch(0, 4, seed=0)
    assert batch.inputs.shape == batch.targets.shape == (4, 16)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])


@pytest.mark.parametrize("order", [2, 6])
def test_ngram_characters_are_distributed_as_in_the_corpus(tiny: Path, order: int) -> None:
    task, windows = sample(tiny, order)
    corpus, sampled = Counter(text_of(task, task.splits[0])), Counter(text_of(task, windows))
    share = {c: (corpus[c] / corpus.total(), sampled[c] / sampled.total()) for c in corpus}
    assert sampled.most_common(1)[0][0] == corpus.most_common(1)[0][0] == " "
    assert abs(share[" "][0] - share[" "][1]) < 0.02
    assert sum(abs(a - b) for a, b in share.values()) / 2 < 0.06  # total variation distance


def test_a_higher_ngram_order_writes_the_corpus_words(tiny: Path) -> None:
    """The fixture's reviews use a few dozen words: a bigram model spells few of them, an
    order-6 model nearly only them."""

    def real_words(order: int) -> float:
        task, windows = sample(tiny, order)
        words = [w for row in windows for w in text_of(task, row).split()[1:-1]]  # whole words
        return sum(w in WORDS for w in words) / len(words)

    assert real_words(2) < 0.5 < 0.95 < real_words(6)


# --- errors ---------------------------------------------------------------------------------


def test_lm_refuses_shards_shorter_than_a_window(tiny: Path) -> None:
    with pytest.raises(SpecError, match=r"spec\.task\.args\.seq_len.*fewer shards"):
        make("lm", tiny).train_data(0, 2000)


def test_ctr_refuses_a_batch_larger_than_the_shard(tiny: Path) -> None:
    data = make("ctr", tiny).train_data(0, 8)
    with pytest.raises(SpecError, match=r"spec\.training\.batchSize: 1000 exceeds"):
        data.batch(0, 1000, seed=0)


@pytest.mark.parametrize("name", ["lm", "ctr"])
def test_missing_data_fails_when_the_task_is_built(tmp_path: Path, name: str) -> None:
    with pytest.raises(datasets.DataMissing, match=f"{tmp_path}.*codistill data fetch"):
        resolve(name, {"data_dir": str(tmp_path)})


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("nosuch", {}, r"spec\.task\.name: expected a built-in task \(lm, ctr\)"),
        ("no_such_module_xyz:make", {}, r"spec\.task\.name: cannot import module"),
        ("json:no_such_factory", {}, r"spec\.task\.name: module 'json' has no attribute"),
        ("math:pi", {}, r"spec\.task\.name: math:pi is not callable"),
        ("json:JSONDecoder", {}, r"spec\.task\.name: .* returned JSONDecoder, expected .*Task"),
        ("lm", {"bogus": 1}, r"spec\.task\.args: .*unexpected keyword argument 'bogus'"),
        ("lm", {"seq_len": 0}, r"spec\.task\.args\.seq_len: expected an integer >= 1"),
        ("ctr", {"hidden": True}, r"spec\.task\.args\.hidden: expected an integer"),
        ("lm", {"cell": "rnn"}, r"spec\.task\.args\.cell: expected one of \['gru', 'lstm'\]"),
        ("lm", {"ngram": 1}, r"spec\.task\.args\.ngram: expected 0 \(off\) or an order in 2\.\.8"),
        ("lm", {"ngram": 9}, r"spec\.task\.args\.ngram: expected 0 \(off\) or an order in"),
        ("lm", {"ngram": 5.0}, r"spec\.task\.args\.ngram: expected an integer >= 0"),
        ("lm", {"ngram": True}, r"spec\.task\.args\.ngram: expected an integer >= 0"),
    ],
)
def test_resolve_errors(tiny: Path, name: str, args: dict, expected: str) -> None:
    with pytest.raises(SpecError, match=expected):
        resolve(name, {**args, "data_dir": str(tiny)} if ":" not in name else args, allow=[name])


USER_TASK = """
    import torch
    from codistill_trainer.tasks import Batch, Task, TrainData

    class Const(TrainData):
        def batch(self, step, batch_size, seed):
            return Batch(torch.ones(batch_size, 2), torch.zeros(batch_size))
        def __len__(self):
            return 1

    class Linear(Task):
        name = "user-linear"
        def __init__(self, width):
            self.width = width
        def model(self):
            return torch.nn.Linear(2, self.width)
        def train_data(self, shard, num_shards):
            return Const()
        def eval_data(self, batch_size, batches):
            return [Const().batch(0, batch_size, 0)] * batches
        def loss(self, output, batch):
            return torch.nn.functional.cross_entropy(output, batch.targets.long())
        def logits(self, output):
            return output

    def make(width=3):
        return Linear(width)
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    package = tmp_path / "codistill_usertask_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(textwrap.dedent(USER_TASK))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "codistill_usertask_pkg.tasks"
    for name in ("codistill_usertask_pkg", "codistill_usertask_pkg.tasks"):
        sys.modules.pop(name, None)


def test_resolve_a_user_task(user_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make = f"{user_module}:make"
    task = resolve(make, {"width": 5}, allow=[make])
    assert isinstance(task, Task) and task.name == "user-linear"
    batch = task.train_data(0, 1).batch(0, 4, 0)
    assert task.logits(task.forward(task.model(), batch)).shape == (4, 5)
    with pytest.raises(SpecError, match=r"spec\.task\.args: .*'depth'"):
        resolve(make, {"depth": 2}, allow=[make])
    monkeypatch.setenv(names.ENV_TASKS, f"x:y, {user_module}:Linear")  # as the job's env says
    assert isinstance(resolve(f"{user_module}:Linear", {"width": 2}), Task)


def test_an_import_path_from_the_bucket_is_never_imported_unless_allowed(
        user_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """run.json is read from a shared bucket: naming `subprocess:run` there must run nothing."""
    monkeypatch.delenv(names.ENV_TASKS, raising=False)
    for name in ("subprocess:run", f"{user_module}:make"):
        with pytest.raises(SpecError, match=rf"spec\.task\.name: '{name}' is not a built-in "
                                            rf"task and CODISTILL_TASKS does not allow it"):
            resolve(name, {"args": ["touch", "/tmp/pwned"]})
    assert "codistill_usertask_pkg.tasks" not in sys.modules  # refused before any import
    monkeypatch.setenv(names.ENV_TASKS, f"{user_module}:make")
    with pytest.raises(SpecError, match="subprocess:run"):
        resolve("subprocess:run", {"args": ["true"]})


def test_ngram_stream_is_the_same_for_a_seed_and_differs_across_seeds(tiny: Path) -> None:
    first, again = (make("lm", tiny, ngram=4).train_data(1, 2) for _ in range(2))
    assert torch.equal(first.batch(7, 8, seed=3).inputs, again.batch(7, 8, seed=3).inputs)
    assert not torch.equal(first.batch(7, 8, seed=3).inputs, again.batch(7, 8, seed=4).inputs)
