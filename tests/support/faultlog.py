"""The fault suite's summary: each scenario records what it injected and what held, and the
session prints one table of them (and writes it as JSON where $CODISTILL_FAULTS_JSON says)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HEADER = ["scenario", "faults", "steps lost", "outcome"]


@dataclass(frozen=True)
class Row:
    scenario: str
    faults: int  # faults injected: outages, kills, corrupt objects, mutated manifests...
    steps_lost: int | None  # training steps redone after the faults (None: not a training)
    outcome: str  # what held, in a few words


class FaultLog:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def __call__(self, scenario: str, faults: int, steps_lost: int | None, outcome: str) -> None:
        self.rows.append(Row(scenario, faults, steps_lost, outcome))

    def lines(self) -> list[str]:
        cells = [HEADER] + [[r.scenario, str(r.faults), "-" if r.steps_lost is None
                             else str(r.steps_lost), r.outcome] for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
        return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]

    def write(self, environ: dict[str, str] = os.environ) -> Path | None:
        where = environ.get("CODISTILL_FAULTS_JSON")
        if not where or not self.rows:
            return None
        path = Path(where)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": _commit(),
            "machine": f"{platform.node()}, {os.cpu_count()} CPUs", "command": "make faults",
            "header": HEADER, "rows": [asdict(r) for r in self.rows]}
        path.write_text(json.dumps(doc, indent=1) + "\n")
        return path


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"
