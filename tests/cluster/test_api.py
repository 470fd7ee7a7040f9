"""The CRD as the real kube-apiserver serves it: installed, documented, and refusing bad input.

kmock and the offline schema checks cannot evaluate CEL, apply defaults before validation, or
serve OpenAPI for `kubectl explain`; the real API server does all three.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cluster.controlplane import ControlPlane
from tests.cluster.stack import Stack
from tests.support.crdschema import INVALID, corpus_entry
from tests.support.kube import manifest


def test_server_version_and_explain(control_plane: ControlPlane, installed: Stack) -> None:
    version = control_plane.kubectl("version", "-o", "json").stdout
    print(control_plane.kubectl("version").stdout)
    assert json.loads(version)["serverVersion"]["gitVersion"].startswith("v1.36.")
    explained = control_plane.kubectl("explain", "codistillation.spec.distillation").stdout
    print(explained)
    assert "maxStalenessSteps" in explained and "exchangeEverySteps + reloadEverySteps" in explained


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_the_api_server_refuses_what_the_crd_refuses(control_plane: ControlPlane, installed: Stack,
                                                     path: Path) -> None:
    doc, field, by = corpus_entry(path)
    doc["metadata"]["name"] = doc["metadata"]["name"][:63]
    applied = control_plane.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(doc),
                                    check=False)
    if by == "operator":  # the schema cannot know: the operator refuses it (tests/controller)
        assert applied.returncode == 0, applied.stderr
        control_plane.kubectl("delete", "codistillation", doc["metadata"]["name"], "--wait=false")
        return
    assert applied.returncode != 0, f"{path.name} was accepted"
    assert field.split(".")[-1] in applied.stderr, applied.stderr


def test_a_valid_run_is_defaulted_and_listed_with_its_columns(control_plane: ControlPlane,
                                                              installed: Stack) -> None:
    doc = manifest("columns", "http://127.0.0.1:9")
    control_plane.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(doc))
    try:
        stored = json.loads(control_plane.kubectl("get", "codistillation", "columns",
                                                  "-o", "json").stdout)
        assert stored["spec"]["distillation"]["teachers"] == "all"  # defaulted by the server
        assert stored["spec"]["training"]["optimizer"]["name"] == "adamw"
        table = control_plane.kubectl("get", "codistillations").stdout
        print(table)
        assert table.split("\n")[0].split() == ["NAME", "GROUPS", "PHASE", "STEP", "LOSS", "AGE"]
        wide = control_plane.kubectl("get", "codistillations", "-o", "wide").stdout
        assert "READY" in wide and "BUCKET" in wide
    finally:
        control_plane.kubectl("delete", "codistillation", "columns", "--wait=false")
