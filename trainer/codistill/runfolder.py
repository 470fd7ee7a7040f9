"""The run folder's files, typed once: one schema, one reader and one writer for each.

`run.json` (the resolved spec), each group's `progress.json` and `final.json`, the channels'
`LATEST.json` pointers and `report/report.json` are written by one side and read by others (the
trainer, the operator, `codistill status`, the report, the benchmarks), all through `RunFolder`.
Everything read from a bucket is untrusted: it is parsed into these models, never evaluated, and a
file that does not parse is reported as unreadable rather than crash its reader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from . import names
from .spec import Codistillation, parse
from .storage import TMP_MARK, Bucket

UNREADABLE = "unreadable"  # the `state` of a progress file that exists but cannot be read


class CorruptCheckpoint(RuntimeError):
    """A pointer or blob that failed verification; it is never loaded."""


# The names a channel's publisher writes: `<step>.<suffix>`, or `<step>.<8 hex>.<suffix>` when
# that step was already published. A pointer's key is one such plain name, never a path.
BLOB_SUFFIXES = ("safetensors", "pt")
_KEY = re.compile(r"([0-9]+)(?:\.[0-9a-f]{8})?\.([a-z]+)", re.ASCII)


def key_step(key: Any, suffixes: tuple[str, ...] = BLOB_SUFFIXES) -> int | None:
    """The step of a blob name the publisher writes with one of `suffixes`; None for any other
    string (a path, `..`, another suffix) or a non-string."""
    m = _KEY.fullmatch(key) if isinstance(key, str) else None
    return int(m.group(1)) if m and m.group(2) in suffixes else None


@dataclass(frozen=True)
class Pointer:
    """A channel's `LATEST.json` (and each entry of its `previous` list): the commit point."""

    step: int
    key: str
    sha256: str
    bytes: int
    time: float

    @classmethod
    def parse(
        cls, data: Any, where: str, suffixes: tuple[str, ...] = BLOB_SUFFIXES
    ) -> Pointer:
        """A pointer read from a bucket: its key must be a blob name of its own channel folder
        (see `key_step`), never a path; anything else is CorruptCheckpoint."""
        if not isinstance(data, dict):
            raise CorruptCheckpoint(f"{where}: malformed pointer (a {type(data).__name__})")
        try:
            pointer = cls(
                step=int(data["step"]), key=data["key"], sha256=str(data["sha256"]),
                bytes=int(data["bytes"]), time=float(data["time"]),
            )
        except (TypeError, KeyError, ValueError, OverflowError) as e:
            raise CorruptCheckpoint(f"{where}: malformed pointer ({e!r})") from None
        if key_step(pointer.key, suffixes) is None:
            raise CorruptCheckpoint(f"{where}: malformed pointer (key {pointer.key!r:.80})")
        if pointer.bytes < 0:
            raise CorruptCheckpoint(f"{where}: malformed pointer (bytes {pointer.bytes})")
        return pointer


class _File(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", allow_inf_nan=False
    )

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")


class Progress(_File):
    """A group's `progress.json`, written by its rank 0 every few steps."""

    group: int = 0
    step: int = 0
    steps: int | None = None
    state: str | None = None  # starting | training | finished | failed | unreadable
    loss: float | None = None
    task_loss: float | None = None
    distill_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    teachers: dict[str, int] = {}  # peer -> the published step this group distills from
    staleness: dict[str, int] = {}  # peer -> steps that teacher is behind this group
    last_published: int | None = None
    examples_per_sec: float | None = None
    time: float | None = None
    resumed_from: int | None = None
    restarts: int = 0  # times this group's rank 0 started again after a first start
    warnings: list[str] = []
    history: list[dict[str, Any]] = []

    @classmethod
    def unreadable(cls, group: int, why: str) -> Progress:
        """A file that exists but cannot be read: shown as such, never as 'not started'."""
        return cls(group=group, state=UNREADABLE, warnings=[why])

    @classmethod
    def parse(cls, doc: Any, group: int, where: str = "progress.json") -> Progress:
        if not isinstance(doc, dict):
            got = type(doc).__name__
            return cls.unreadable(group, f"{where}: expected a JSON object, got {got}")
        try:
            return cls.model_validate(doc)
        except ValidationError as e:
            return cls.unreadable(group, f"{where} unreadable ({e.error_count()} errors)")


class Final(_File):
    """A group's `final.json`: written once it has finished, naming its final teacher blob."""

    step: int
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    teacher: dict[str, Any] | None = None  # the Pointer of the final published weights

    def pointer(self, where: str) -> Pointer | None:
        return None if self.teacher is None else Pointer.parse(self.teacher, where)


class Score(_File):
    loss: float
    accuracy: float


class GroupScore(Score):
    group: int


class Churn(_File):
    flip: float  # fraction of examples whose top class differs
    mad: float  # mean absolute difference of the predicted probabilities


class PairChurn(Churn):
    a: int
    b: int


class ChurnSummary(_File):
    pairs: list[PairChurn]
    mean: Churn


class Report(_File):
    """`report/report.json`: every group on the same eval set, their ensemble and churn."""

    examples: int
    groups: list[GroupScore]
    ensemble: Score | None = None
    churn: ChurnSummary | None = None
    training: list[dict[str, Any]] = []  # how each group's training ended (from progress.json)


class RunFolder:
    """One run's folder in the bucket (CODISTILL_RUN_URL), read and written through the models."""

    def __init__(self, bucket: Bucket):
        self.bucket = bucket

    @property
    def url(self) -> str:
        return self.bucket.url

    def where(self, rel: str) -> str:
        return f"{self.bucket.url}/{rel}"

    def read_run(self) -> Codistillation | None:
        """The spec in force, None when there is no run.json; SpecError when it is invalid."""
        doc = self.bucket.get_json(names.RUN_JSON)
        return None if doc is None else parse(doc, self.where(names.RUN_JSON))

    def write_run(self, run: Codistillation) -> None:
        self.bucket.put_json(names.RUN_JSON, run.resolved())

    def remove_temporaries(self, group: int) -> None:
        """Delete what writes of this group's own files left when killed mid-way (local folders
        only: `<name>.tmp-<hex>`, see `Bucket.put`). For the group's rank 0 before it writes
        anything, so none of its writes is in flight; its channels clean their own folders."""
        folder = names.group_dir(group)
        for name in self.bucket.ls(folder):
            if TMP_MARK in name:
                self.bucket.rm(f"{folder}/{name}")

    def progress(self, group: int) -> Progress | None:
        """A group's progress; None before it wrote any. Content that does not parse (torn on a
        local disk, corrupt) comes back as an unreadable Progress; a bucket failure raises."""
        rel = names.progress_file(group)
        try:
            doc = self.bucket.get_json(rel)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            return Progress.unreadable(group, f"{rel}: {type(e).__name__}: {e}")
        return None if doc is None else Progress.parse(doc, group, rel)

    def write_progress(self, progress: Progress) -> None:
        self.bucket.put_json(names.progress_file(progress.group), progress.dump())

    def final(self, group: int) -> Final | None:
        doc = self.bucket.get_json(names.final_file(group))
        if doc is None:
            return None
        try:
            return Final.model_validate(doc)
        except ValidationError as e:
            raise CorruptCheckpoint(f"{self.where(names.final_file(group))}: {e}") from None

    def write_final(self, group: int, final: Final) -> None:
        self.bucket.put_json(names.final_file(group), final.dump())

    def report(self) -> Report | None:
        doc = self.bucket.get_json(names.REPORT_JSON)
        return None if doc is None else Report.model_validate(doc)

    def write_report(self, report: Report, curves_png: bytes, summary_md: str) -> None:
        self.bucket.put_json(names.REPORT_JSON, report.dump())
        self.bucket.put(names.CURVES_PNG, curves_png)
        self.bucket.put(names.SUMMARY_MD, summary_md.encode())
