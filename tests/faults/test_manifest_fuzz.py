"""Hostile manifests: about 500 mutants of the quickstart (tests/support/manifest_fuzz.py), each
through everything `codistill run` and a cluster do with a manifest before any process starts.

Every case must be accepted, or refused with a SpecError of one short line that names the file or
the field: never another exception, a blow-up or a hang. The corpus runs in one child process
with bounded memory and a per-case deadline, so that a case that kills it is named, not pytest
killed. A sample of refused cases then goes through the real `codistill validate` and `run`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import manifest_fuzz
from tests.support.faultlog import FaultLog

pytestmark = [pytest.mark.faults]
MAX_MESSAGE = 600  # characters of an error, besides the file's path
MAX_DEATHS = 5  # child processes lost to cases before giving up on the rest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("manifests")
    manifest_fuzz.write(manifest_fuzz.corpus(), folder)
    return folder


@pytest.fixture(scope="module")
def results(corpus: Path) -> dict[str, dict[str, Any]]:
    """Each case's record from the checking process; a case during which that process died
    (memory, a native crash, the deadline) is recorded as `died`, and the rest run in a new one."""
    ids = (corpus / "cases.txt").read_text().split()
    found: dict[str, dict[str, Any]] = {}
    deaths = 0
    while len(found) < len(ids):
        proc = subprocess.run(
            [sys.executable, "-m", "tests.support.manifest_fuzz", str(corpus), str(len(found))],
            cwd=manifest_fuzz.ROOT, capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            found[record.pop("id")] = record
        if len(found) < len(ids):
            deaths += 1
            assert deaths <= MAX_DEATHS, f"the checking process keeps dying: {proc.stderr[-3000:]}"
            found[ids[len(found)]] = {"outcome": "died", "stage": "?",
                                      "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    return found


def message_problem(message: str, path: Path) -> str | None:
    """Why an error message is not one short line naming the file or a field, or None."""
    if len(message.splitlines()) != 1 or "\n" in message or "\r" in message:
        return "more than one line"
    if len(message) > len(str(path)) + MAX_MESSAGE:
        return f"{len(message)} characters"
    if not (message.startswith(f"{path}: ") or message.startswith("spec")):
        return "names neither the file nor a field"
    return None


def test_every_case_is_accepted_or_refused_in_one_line(
        corpus: Path, results: dict[str, dict[str, Any]], fault_log: FaultLog) -> None:
    bad = []
    for case_id, r in results.items():
        path = corpus / f"{case_id}.yaml"
        if r["outcome"] not in ("accepted", "refused"):
            bad.append(f"{case_id}: {r['outcome']} at {r['stage']}: {r['error'][:300]}")
            continue
        for key in ("error", "cluster"):
            message = r.get(key, "accepted")
            if message not in ("accepted", "refused") and (why := message_problem(message, path)):
                bad.append(f"{case_id}: {key} message {why}: {message[:300]!r}")
    assert not bad, f"{len(bad)} of {len(results)} cases:\n" + "\n".join(bad[:30])

    refused = sum(r["outcome"] == "refused" for r in results.values())
    accepted = len(results) - refused
    local_only = sum(r["outcome"] == "accepted" and r["cluster"] != "accepted"
                     for r in results.values())
    fault_log(f"manifest fuzz (seed {manifest_fuzz.SEED})", faults=len(results), steps_lost=None,
              outcome=f"{refused} refused in one line, {accepted} accepted "
                      f"({local_only} only locally), 0 tracebacks")


def test_the_corpus_covers_what_a_manifest_can_get_wrong(
        results: dict[str, dict[str, Any]]) -> None:
    """Some of every kind of case reach each outcome they should: a corpus whose mutants all
    fail the first check (or all pass) would test nothing."""
    stages = {r.get("stage") for r in results.values() if r["outcome"] == "refused"}
    assert {"load", "capacity"} <= stages
    assert sum(r["outcome"] == "accepted" for r in results.values()) > 50
    assert results["large-100k-keys"]["outcome"] == "accepted"
    for case_id in ("alias-laughs-args", "nest-args-flow-list-10000", "duplicate-groups",
                    "bytes-random", "tag-args-python-apply"):
        assert results[case_id]["outcome"] == "refused", (case_id, results[case_id])


# Refused by `codistill run` before it starts anything: by spec.load, or by its capacity check.
# The last three give messages longer than a 150-column console: still one line.
CLI_SAMPLE = ["bytes-random", "bytes-utf32", "empty-zero", "document-list", "name-0",
              "alias-laughs-template", "nest-args-flow-map-3000", "tag-args-python-apply",
              "duplicate-groups", "large-5000-digit-groups", "capacity-cluster-sized",
              "large-10k-unknown", "leaf-spec.groups-3", "name-10"]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case_id", CLI_SAMPLE)
def test_the_cli_refuses_in_one_line(case_id: str, command: str, corpus: Path,
                                     results: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    record = results[case_id]
    assert record["outcome"] == "refused" and record["stage"] in ("load", "capacity"), record
    if command == "validate" and record["stage"] == "capacity":
        pytest.skip("valid on a cluster: only a local run is refused")
    shutil.copyfile(corpus / f"{case_id}.yaml", tmp_path / "case.yaml")
    proc = subprocess.run([sys.executable, "-m", "codistill_trainer", command, "case.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = (proc.stdout + proc.stderr).strip()
    assert "Traceback" not in output, output[-3000:]
    assert proc.returncode == 2, output[-3000:]
    assert output.startswith("error: ") and len(output.splitlines()) == 1, output[:3000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.yaml"]  # nothing started
