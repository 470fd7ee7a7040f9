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
from tests.support.kube import manifest, wait_for


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
        assert "READY" in wide and "JOBS" in wide and "BUCKET" in wide
    finally:
        control_plane.kubectl("delete", "codistillation", "columns", "--wait=false")


def test_a_status_write_for_a_version_replaced_meanwhile_is_refused(control_plane: ControlPlane,
                                                                    installed: Stack) -> None:
    """What keeps a slow status refresh of a deleted run off the run created again under its
    name (status/write.py, `exact`): the real API server's resourceVersion precondition."""
    import kubernetes
    from kubernetes.client.exceptions import ApiException

    from codistill_operator.k8s import Api

    api = Api(kubernetes.config.new_client_from_config(str(control_plane.kubeconfig)))
    doc = manifest("versions", "http://127.0.0.1:9")  # no bucket: the operator records that once
    control_plane.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(doc))
    try:
        wait_for(lambda: (api.get_run("default", "versions").get("status") or {}).get(
            "conditions"), "the operator's verdict")  # then it leaves the run alone for 30 s
        def write_fresh() -> str | None:
            """Read, then write that version; None when the operator wrote in between."""
            read = api.get_run("default", "versions")["metadata"]["resourceVersion"]
            try:
                api.patch_status("default", "versions", {"step": 1}, read)
            except ApiException as e:
                if e.status != 409:
                    raise
                return None
            return read

        read = wait_for(write_fresh, "a write of the version just read")  # written
        with pytest.raises(ApiException) as refused:
            api.patch_status("default", "versions", {"step": 2}, read)  # now stale
        assert refused.value.status == 409
        assert api.get_run("default", "versions")["status"]["step"] == 1
    finally:
        control_plane.kubectl("delete", "codistillation", "versions", "--wait=false")


def test_a_second_release_watching_every_namespace_is_refused(control_plane: ControlPlane,
                                                               installed: Stack,
                                                               tmp_path: Path) -> None:
    """Row 17 across releases: the Lease covers replicas and releases in one namespace; a
    release elsewhere that would act on the same runs is refused at install."""
    from tests.support.helm import CHART, Helm, ensure_helm

    helm = Helm(ensure_helm(), tmp_path)
    refused = helm.run("install", "second", str(CHART), "-n", "second", "--create-namespace",
                       "--kubeconfig", str(control_plane.kubeconfig),
                       "--set", "image.repository=localhost:5000/codistill/operator",
                       "--skip-crds")
    assert refused.returncode != 0
    assert "release codistill in namespace codistill already watches every namespace" in (
        refused.stderr), refused.stderr
    assert "second" not in control_plane.kubectl("get", "deployments", "-A").stdout
