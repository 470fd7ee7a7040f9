"""Terminal tables: progress rows (groups not started, unreadable files) and the final report."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from rich.console import Console
from rich.table import Table

from codistill import names, spec
from codistill.runfolder import UNREADABLE, Progress, Report, RunFolder
from codistill.storage import Bucket, StorageError
from codistill_trainer import tables

RUN = spec.parse({
    "apiVersion": "codistill.io/v1alpha1", "kind": "Codistillation",
    "metadata": {"name": "demo"}, "spec": {"groups": 3, "training": {"steps": 600}},
})
TRAINING = {
    "group": 0, "step": 120, "steps": 600, "state": "training", "loss": 2.1, "taskLoss": 1.9,
    "distillLoss": 0.2, "evalLoss": 2.05, "evalAccuracy": 0.41,
    "teachers": {"10": 90, "2": 100}, "staleness": {"10": 30, "2": 20}, "lastPublished": 100,
    "examplesPerSec": 812.0, "time": 1764250000.0, "resumedFrom": 40, "restarts": 1,
    "warnings": ["old one", "[s3] peer 2 teacher is stale"], "history": [],
}


def render(table: Table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


@pytest.fixture
def bucket(tmp_path) -> Bucket:
    return Bucket(str(tmp_path / "run"))


@contextmanager
def blackhole() -> Iterator[tuple[str, list[socket.socket]]]:
    """An endpoint that accepts connections and never answers; yields it and the connections
    it accepted so far."""
    accepted: list[socket.socket] = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)

        def accept() -> None:
            with contextlib.suppress(OSError):
                while True:
                    accepted.append(s.accept()[0])

        threading.Thread(target=accept, daemon=True).start()
        yield f"http://127.0.0.1:{s.getsockname()[1]}", accepted
        s.shutdown(socket.SHUT_RDWR)
    for c in accepted:
        c.close()


def view(progress: dict, **kw) -> tables.View:
    return tables.View("s3://b/ns/demo", progress, **kw)


def test_load_progress_absent_good_and_corrupt(bucket: Bucket) -> None:
    bucket.put_json(names.progress_file(0), TRAINING)
    bucket.put(names.progress_file(2), b'{"group": 2, "step": 1')  # half-written
    found = tables.load_progress(RunFolder(bucket), 3)
    assert found[0].dump() == TRAINING
    assert found[1] is None
    assert found[2].state == UNREADABLE
    assert "groups/2/progress.json" in found[2].warnings[0]


def test_load_progress_rejects_non_objects(bucket: Bucket) -> None:
    bucket.put(names.progress_file(0), json.dumps([1, 2]).encode())
    bucket.put(names.progress_file(1), b"\xff\xfe not utf-8")
    found = tables.load_progress(RunFolder(bucket), 2)
    assert [found[g].state for g in (0, 1)] == [UNREADABLE] * 2
    assert "expected a JSON object, got list" in found[0].warnings[0]


def test_progress_table_rows(bucket: Bucket) -> None:
    bucket.put_json(names.progress_file(0), TRAINING)
    bucket.put(names.progress_file(2), b"{not json")
    progress = tables.load_progress(RunFolder(bucket), 3)
    text = render(tables.progress_table("demo", view(progress), RUN.spec, now=TRAINING["time"] + 12))
    row0, row1, row2 = (next(line for line in text.splitlines() if line.split()[:1] == [str(g)])
                        for g in range(3))
    for cell in ("training", "120/600 20%", " 12s ", "2.100", "1.900", "0.200", "2.050",
                 "2:100, 10:90", "30", "100", "812", "40", "[s3] peer 2 teacher is stale (+1)"):
        assert cell in row0, cell
    assert "waiting" in row1 and "0/600 0%" in row1
    assert "unreadable" in row2 and "JSONDecodeError" in row2
    assert "demo: 3 group(s), 600 steps" in text


def test_progress_table_survives_fields_of_the_wrong_type(bucket: Bucket) -> None:
    bucket.put_json(names.progress_file(0), {"step": "many", "state": "training"})
    bucket.put_json(names.progress_file(1), ["x"])
    progress = tables.load_progress(RunFolder(bucket), 2)
    text = render(tables.progress_table("demo", view(progress), RUN.spec))
    states = [line.split()[1] for line in text.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert states == ["unreadable"] * 2 and "waiting" in text  # group 2 has no entry


def test_progress_table_first_steps_have_no_optional_values() -> None:
    starting = {"group": 0, "step": 0, "steps": 600, "state": "starting", "loss": None,
                "taskLoss": None, "distillLoss": None, "evalLoss": None, "teachers": {},
                "staleness": {}, "lastPublished": None, "examplesPerSec": None,
                "resumedFrom": None, "warnings": []}
    row = tables.progress_row(0, Progress.parse(starting, 0), 600, now=0.0)
    assert row[:3] == ["0", "starting", "0/600 0%"] and set(row[3:-1]) == {"-"}


@pytest.mark.parametrize("state, age, cell", [
    ("training", 12.4, "12s"),
    ("training", 45 * 60, "45m"),  # a trainer that cannot write: its age keeps growing
    ("starting", 3 * 3600, "3h"),
    ("training", -2, "0s"),  # its clock a little ahead of ours
    ("finished", 45 * 60, "-"),  # done writing: an old file is expected
    ("failed", 12, "-"),
    (UNREADABLE, 12, "-"),
])
def test_age_is_shown_while_a_group_should_keep_writing(state: str, age: float, cell: str) -> None:
    p = Progress.parse({**TRAINING, "state": state}, 0)
    assert tables.progress_row(0, p, 600, now=TRAINING["time"] + age)[3] == cell
    assert tables.progress_row(1, None, 600, now=0.0)[3] == "-"  # waiting


def test_a_store_failure_ends_the_pass_and_keeps_what_was_read(bucket: Bucket) -> None:
    """The first failing read stops the others (each would wait out its timeout); the groups
    not read keep their last progress, or say why they have none."""
    for g in range(3):
        bucket.put_json(names.progress_file(g), {**TRAINING, "group": g, "step": 10 + g})
    folder = tables.viewer_folder(bucket.url)
    last = tables.load_progress(folder, 3)
    for g in (0, 2):
        bucket.put_json(names.progress_file(g), {**TRAINING, "group": g, "step": 50 + g})
    bucket.rm(names.progress_file(1))
    bucket.fs.makedirs(bucket.path(names.progress_file(1)))  # reading it fails: IsADirectoryError
    found, error = tables.read_progress(folder, 3, last)
    assert isinstance(error, StorageError) and "groups/1/progress.json" in str(error)
    assert [found[g].step for g in range(3)] == [50, 11, 12]  # group 2 was not read again
    found, _ = tables.read_progress(folder, 3)
    assert found[0].step == 50 and [found[g].state for g in (1, 2)] == [UNREADABLE] * 2
    assert "StorageError" in found[2].warnings[0]


def test_a_black_holed_store_costs_a_viewer_one_request(monkeypatch) -> None:
    """One attempt of one request for all the groups (not botocore's retry, not one per group):
    the black hole sees a single connection, and the read fails with a timeout."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with blackhole() as (endpoint, connections):
        result = tables.read_view(tables.viewer_folder("s3://b/ns/demo", endpoint), 4)
    assert result.error is not None and "Timeout" in str(result.error), result.error
    assert len(connections) == 1
    assert {p.state for p in result.progress.values()} == {UNREADABLE}


def test_the_watch_keeps_the_last_progress_and_says_how_long_the_store_fails(
        bucket: Bucket) -> None:
    bucket.put_json(names.progress_file(0), TRAINING)
    watch = tables.ProgressWatch(tables.viewer_folder(bucket.url), 1)
    good = watch.read()
    assert good.error is None and good.progress[0].step == 120 and good.read_at is not None
    bucket.rm(names.progress_file(0))
    bucket.fs.makedirs(bucket.path(names.progress_file(0)))
    first, second = watch.read(), watch.read()
    assert second.progress[0].step == 120 and second.read_at == good.read_at
    assert first.failing_since == second.failing_since >= good.read_at
    line = tables.store_line(second, now=second.failing_since + 12)
    assert line.startswith(f"store {bucket.url} unreachable for 12 s (read {bucket.url}/groups/0")
    assert "IsADirectoryError" in line and line.endswith(
        f"showing progress read {second.failing_since + 12 - good.read_at:.0f} s ago")
    bucket.rm(names.progress_file(0))
    bucket.put_json(names.progress_file(0), {**TRAINING, "step": 130})
    again = watch.read()
    assert again.error is None and again.failing_since is None and again.progress[0].step == 130
    assert tables.store_line(again, now=time.time()) is None


def test_the_watch_reads_on_its_own_thread(bucket: Bucket) -> None:
    bucket.put_json(names.progress_file(0), TRAINING)
    with tables.ProgressWatch(RunFolder(bucket), 1, interval=0.01) as watch:
        deadline = time.monotonic() + 5
        while watch.view.read_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
    assert watch.view.progress[0].step == 120


def test_the_store_line_is_under_the_title_as_written() -> None:
    error = StorageError("read s3://b/ns/demo/groups/0/progress.json: ReadTimeoutError: "
                         "[/x] Read timeout\non endpoint")
    trouble = view({0: Progress.parse(TRAINING, 0)}, error=error, failing_since=1000.0,
                   read_at=990.0)
    text = render(tables.progress_table("demo", trouble, RUN.spec, now=1030.0))
    title, header = text.split(" group ")[0].split("\n", 1)  # the line wraps at the table's width
    assert title.strip() == "demo: 3 group(s), 600 steps"
    assert " ".join(header.split()) == (
        "store s3://b/ns/demo unreachable for 30 s (read s3://b/ns/demo/groups/0/progress.json: "
        "ReadTimeoutError: [/x] Read timeout on endpoint): showing progress read 40 s ago")
    healthy = render(tables.progress_table("demo", view({}), RUN.spec))
    assert "unreachable" not in healthy


def result(groups: int) -> dict:
    out = {"examples": 64, "groups": [{"group": g, "loss": 1.5 + g / 10, "accuracy": 0.5}
                                      for g in range(groups)], "ensemble": None, "churn": None}
    if groups > 1:
        out["ensemble"] = {"loss": 1.25, "accuracy": 0.625}
        out["churn"] = {"pairs": [{"a": 0, "b": 1, "flip": 0.125, "mad": 0.0312}],
                        "mean": {"flip": 0.125, "mad": 0.0312}}
    return out


def test_report_table_rows() -> None:
    text = render(tables.report_table(Report.model_validate(result(2))))
    lines = text.splitlines()
    for name, cells in (("group 0", ["1.5000", "50.0%"]), ("group 1", ["1.6000"]),
                        ("ensemble", ["1.2500", "62.5%"]), ("churn 0 vs 1", ["12.5%", "0.0312"]),
                        ("churn (mean)", ["12.5%"])):
        line = next(line for line in lines if f"│ {name} " in line)
        assert all(c in line for c in cells), (name, line)
    # report.json read back renders the same
    read_back = Report.model_validate(json.loads(json.dumps(result(2))))
    assert render(tables.report_table(read_back)) == text


def test_report_table_one_group() -> None:
    text = render(tables.report_table(Report.model_validate(result(1))))
    assert "group 0" in text and "ensemble" not in text and "churn 0" not in text
