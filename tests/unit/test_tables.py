"""Terminal tables: progress rows (groups not started, unreadable files) and the final report."""

from __future__ import annotations

import json

import pytest
from rich.console import Console
from rich.table import Table

from codistill import names, spec
from codistill.runfolder import UNREADABLE, Progress, Report, RunFolder
from codistill.storage import Bucket
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
    text = render(tables.progress_table("demo", tables.load_progress(RunFolder(bucket), 3),
                                        RUN.spec))
    row0, row1, row2 = (next(line for line in text.splitlines() if line.split()[:1] == [str(g)])
                        for g in range(3))
    for cell in ("training", "120/600 20%", "2.100", "1.900", "0.200", "2.050",
                 "2:100, 10:90", "30", "100", "812", "40", "[s3] peer 2 teacher is stale (+1)"):
        assert cell in row0, cell
    assert "waiting" in row1 and "0/600 0%" in row1
    assert "unreadable" in row2 and "JSONDecodeError" in row2
    assert "demo: 3 group(s), 600 steps" in text


def test_progress_table_survives_fields_of_the_wrong_type(bucket: Bucket) -> None:
    bucket.put_json(names.progress_file(0), {"step": "many", "state": "training"})
    bucket.put_json(names.progress_file(1), ["x"])
    progress = tables.load_progress(RunFolder(bucket), 2)
    text = render(tables.progress_table("demo", progress, RUN.spec))
    states = [line.split()[1] for line in text.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert states == ["unreadable"] * 2 and "waiting" in text  # group 2 has no entry


def test_progress_table_first_steps_have_no_optional_values() -> None:
    starting = {"group": 0, "step": 0, "steps": 600, "state": "starting", "loss": None,
                "taskLoss": None, "distillLoss": None, "evalLoss": None, "teachers": {},
                "staleness": {}, "lastPublished": None, "examplesPerSec": None,
                "resumedFrom": None, "warnings": []}
    row = tables.progress_row(0, Progress.parse(starting, 0), 600)
    assert row[:3] == ["0", "starting", "0/600 0%"] and set(row[3:-1]) == {"-"}


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
