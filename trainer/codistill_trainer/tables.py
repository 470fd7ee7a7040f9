"""Terminal tables (rich): live per-group progress and the final report.

Torch-free, so `codistill status RUN` starts fast. Progress files are written by running trainers
while this reads them, so a missing, half-written or odd file becomes a row saying so (see
`runfolder.Progress.parse`), never a crash.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from rich import box
from rich.table import Table
from rich.text import Text

from codistill.runfolder import UNREADABLE, Progress, Report, RunFolder
from codistill.spec import Spec
from codistill.storage import Bucket, StorageError

WAITING = "waiting"
ACTIVE = ("starting", "training")  # states whose progress.json should keep being rewritten
STATE_STYLES = {
    "finished": "green",
    "failed": "bold red",
    "starting": "yellow",
    WAITING: "dim",
    UNREADABLE: "red",
}
# Short headers: fourteen columns must fit a 120-column terminal.
PROGRESS_HEADER = [
    "group", "state", "step", "age", "loss", "task", "distill", "eval",
    "teachers", "stale", "published", "ex/s", "resumed", "warnings",
]
REPORT_HEADER = ["model", "eval loss", "accuracy", "churn flip", "churn mad"]
WARNING_CHARS = 40
ERROR_CHARS = 200  # of a store error in the line under the title
NONE = "-"
# A viewer's store reads: one attempt of at most this long per request, so `codistill status`
# answers within seconds when the store is down or black-holed (the trainers' 4 x 30 s are for
# riding out an outage); the live table's next read is its retry.
VIEW_TIMEOUT_S = 3.0
READ_INTERVAL_S = 0.5  # between the live table's reads of the progress files


def viewer_folder(url: str, endpoint: str | None = None) -> RunFolder:
    return RunFolder(Bucket(url, endpoint, attempts=1, timeout=VIEW_TIMEOUT_S))


def read_progress(
    folder: RunFolder, groups: int, last: dict[int, Progress | None] | None = None
) -> tuple[dict[int, Progress | None], StorageError | None]:
    """Every group's progress (None: not written yet; a torn or corrupt file is an 'unreadable'
    Progress saying why, see `RunFolder.progress`), and the store failure that cut the pass short.

    The first failure ends the pass: with the store down, each further read would wait out its
    timeout too. The groups not read keep their progress in `last`, else are an unreadable row
    naming the failure, so the display shows it rather than crash or pretend they did not start.
    """
    found: dict[int, Progress | None] = {}
    for g in range(groups):
        try:
            found[g] = folder.progress(g)
        except StorageError as e:
            for rest in range(g, groups):
                found[rest] = (last or {}).get(rest) or Progress.unreadable(
                    rest, f"StorageError: {e}")  # `e` names the file that failed
            return found, e
    return found, None


def load_progress(folder: RunFolder, groups: int) -> dict[int, Progress | None]:
    """Every group's progress, as `read_progress` (for callers with no use for the failure)."""
    return read_progress(folder, groups)[0]


@dataclass(frozen=True)
class View:
    """What a viewer read of a run folder: each group's progress and, while the store fails,
    the failure, since when (live only) and when every group's progress was last read."""

    url: str
    progress: dict[int, Progress | None]
    error: StorageError | None = None
    failing_since: float | None = None  # time.time() the first failed pass in a row began
    read_at: float | None = None  # time.time() the last whole pass ended


def read_view(folder: RunFolder, groups: int) -> View:
    """One pass over the progress files (`codistill status`)."""
    return View(folder.url, *read_progress(folder, groups))


def store_line(view: View, now: float) -> str | None:
    """The line under the title while the store fails: which store, the error, for how long,
    and how old the progress shown is; None while it answers."""
    if view.error is None:
        return None
    line = f"store {view.url} unreachable"
    if view.failing_since is not None:
        line += f" for {now - view.failing_since:.0f} s"
    line += f" ({short(' '.join(str(view.error).split()), ERROR_CHARS)})"
    if view.read_at is not None:
        line += f": showing progress read {now - view.read_at:.0f} s ago"
    return line


class ProgressWatch:
    """Reads the progress files on its own thread, so a hung store never holds the display nor
    the launcher's crash detection; `view` is the newest, with the last progress read of each
    group kept while the store fails."""

    def __init__(self, folder: RunFolder, groups: int, interval: float = READ_INTERVAL_S):
        self.folder, self.groups, self.interval = folder, groups, interval
        self.view = View(folder.url, {})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def read(self) -> View:
        """One pass now; returns the new view (and makes it `view`)."""
        started, last = time.time(), self.view
        progress, error = read_progress(self.folder, self.groups, last.progress)
        if error is None:
            self.view = View(last.url, progress, read_at=time.time())
        else:
            self.view = View(last.url, progress, error, last.failing_since or started,
                             last.read_at)
        return self.view

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.read()
            self._stop.wait(self.interval)

    def __enter__(self) -> ProgressWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        # Not joined: a read in flight on a hung store must not hold up the caller (the thread
        # is a daemon; what it reads after this is never shown).
        self._stop.set()


def num(x: float | None, digits: int = 3) -> str:
    """A float for a cell; '-' for a missing value."""
    if x is None:
        return NONE
    x = float(x)
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


def percent(x: float | None) -> str:
    return NONE if x is None else f"{100 * float(x):.1f}%"


def short(text: str, limit: int = WARNING_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def warnings_cell(warnings: list[str] | None) -> str:
    """The newest warning, shortened, and how many more there are."""
    if not warnings:
        return ""
    more = f" (+{len(warnings) - 1})" if len(warnings) > 1 else ""
    return short(str(warnings[-1])) + more


def step_cell(step: int, steps: int | None) -> str:
    if not steps:
        return str(step)
    return f"{step}/{steps} {100 * step / steps:.0f}%"


def age_cell(p: Progress, now: float) -> str:
    """Seconds since the group last wrote its progress, while it should keep writing it: it
    grows when its trainer cannot write (store down, disk full) though this reader can read."""
    if p.state not in ACTIVE or p.time is None:
        return NONE
    age = max(0.0, now - p.time)  # a trainer's clock slightly ahead is not a negative age
    return f"{age:.0f}s" if age < 120 else f"{age / 60:.0f}m" if age < 7200 else f"{age / 3600:.0f}h"


def progress_row(group: int, p: Progress | None, steps: int, now: float) -> list[str]:
    """The cells of one group's row; a group with no progress yet is 'waiting'."""
    if p is None:
        return [str(group), WAITING, step_cell(0, steps)] + [NONE] * 10 + [""]
    return [
        str(group),
        p.state or NONE,
        step_cell(p.step, p.steps or steps),
        age_cell(p, now),
        num(p.loss),
        num(p.task_loss),
        num(p.distill_loss),
        num(p.eval_loss),
        ", ".join(f"{peer}:{p.teachers[peer]}" for peer in sorted(p.teachers, key=int)) or NONE,
        str(max(p.staleness.values())) if p.staleness else NONE,
        NONE if p.last_published is None else str(p.last_published),
        num(p.examples_per_sec, 0),
        NONE if p.resumed_from is None else str(p.resumed_from),
        warnings_cell(p.warnings),
    ]


def progress_table(run_name: str, view: View, spec: Spec, now: float | None = None) -> Table:
    """One row per group of the run (`codistill status` and the live view of `codistill run`),
    under a line naming the store while it fails."""
    now = time.time() if now is None else now
    steps = spec.training.steps
    # Text, not markup: a warning like "[s3] timeout" or an error must print as written.
    title = Text(f"{run_name}: {spec.groups} group(s), {steps} steps")
    trouble = store_line(view, now)
    if trouble:
        title.append(f"\n{trouble}", style="bold red")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True,
                  pad_edge=False)
    for name in PROGRESS_HEADER:
        left = name in ("group", "state", "warnings")
        table.add_column(name, justify="left" if left else "right", no_wrap=name != "warnings")
    for g in range(spec.groups):
        *cells, warnings = progress_row(g, view.progress.get(g), steps, now)
        table.add_row(*map(Text, cells), Text(warnings, style="yellow"),
                      style=STATE_STYLES.get(cells[1], ""))
    return table


def report_rows(result: Report) -> list[list[str]]:
    """Rows under REPORT_HEADER: each group, the ensemble, each pair's churn and the mean churn.

    Shared by the terminal table and report/summary.md so the two always agree.
    """
    rows = [
        [f"group {g.group}", num(g.loss, 4), percent(g.accuracy), NONE, NONE]
        for g in result.groups
    ]
    if result.ensemble:
        e = result.ensemble
        rows.append(["ensemble", num(e.loss, 4), percent(e.accuracy), NONE, NONE])
    if result.churn:
        for c in result.churn.pairs:
            rows.append([f"churn {c.a} vs {c.b}", NONE, NONE, percent(c.flip), num(c.mad, 4)])
        mean = result.churn.mean
        rows.append(["churn (mean)", NONE, NONE, percent(mean.flip), num(mean.mad, 4)])
    return rows


def report_table(result: Report) -> Table:
    """The final report: per-group eval loss and accuracy, the ensemble, and churn."""
    table = Table(title=f"Final evaluation ({result.examples} examples)", title_justify="left")
    for i, name in enumerate(REPORT_HEADER):
        table.add_column(name, justify="left" if i == 0 else "right")
    previous = ""
    for row in report_rows(result):
        if row[0].startswith("churn") and not previous.startswith("churn"):
            table.add_section()  # a rule between the models and the churn between them
        style = "bold" if row[0] in ("ensemble", "churn (mean)") else ""
        table.add_row(*map(Text, row), style=style)
        previous = row[0]
    return table
