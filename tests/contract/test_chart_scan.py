"""The rendered chart judged by outside tools, and the RBAC gap one of them has.

- kubernetes-validate: every rendered object, and the chart's CRD, against the OpenAPI schemas
  of the oldest Kubernetes the chart claims (Chart.yaml `kubeVersion`) and of the newest the
  package ships, strict (an unknown field is an error, as with `kubectl apply`).
- checkov: its Kubernetes checks on the renders; every failed check must be in
  charts/codistill/checkov-skips.yaml with its reason, and every entry there must still fail.
- Secrets: no ClusterRole reads any (checkov's CKV2_K8S_5 misses that), Roles grant `get` where
  runs keep them, and a read RBAC forbids is a MissingSecret (the run's Ready=False condition)
  naming the chart value to set.
"""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes_validate import SchemaNotFoundError, ValidationError, latest_version
from kubernetes_validate.utils import major_minor

from codistill_operator import bucket
from codistill_operator.errors import MissingSecret
from tests.support import checkov
from tests.support.helm import CHART, NAMESPACE, Helm, HelmUnavailable, Rendered, ensure_helm

# The chart has no default operator image (nobody publishes one): every render names one.
IMAGE = {"image.repository": "registry.example/codistill/operator"}
RENDERS: dict[str, dict[str, Any]] = {
    "defaults": IMAGE,
    # Watching all namespaces with the dev store: Secret Roles where it copies its Secret.
    "devObjectStore": {**IMAGE, "devObjectStore.enabled": True},
    # Every optional object: namespaced Roles, the dev store, the ServiceMonitor.
    "everything": {
        **IMAGE,
        "watchNamespaces": ["team-a", "team-b"],
        "devObjectStore.enabled": True,
        "devObjectStore.secretNamespaces": ["team-c"],
        "metrics.serviceMonitor.enabled": True,
    },
}
# Kinds of other projects' CRDs, which no core schema has. Each must stay unknown to
# kubernetes-validate (else it is validated like the rest); test_chart.py checks their fields.
CRD_KINDS = {"ServiceMonitor": "monitoring.coreos.com/v1, the Prometheus Operator's CRD"}
# Kinds checkov 3.3.30 has no check for: every other rendered object must appear in its report.
UNCHECKED_BY_CHECKOV = {"ServiceMonitor", "NetworkPolicy"}
SKIPS = CHART / "checkov-skips.yaml"
READ_SECRETS = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}


def kube_versions() -> list[str]:
    """The oldest Kubernetes the chart claims and the newest kubernetes-validate has schemas of."""
    claim = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    oldest = re.fullmatch(r">=\s*(\d+\.\d+\.\d+)(-0)?", claim)
    assert oldest, f"Chart.yaml kubeVersion {claim!r}: expected '>=X.Y.Z-0'"
    return [oldest.group(1), latest_version()]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    try:
        binary = ensure_helm()
    except HelmUnavailable as e:
        pytest.skip(f"the real helm binary cannot be installed here: {e}")
    helm = Helm(binary, tmp_path_factory.mktemp("helm-home"))
    return {name: helm.render(values) for name, values in RENDERS.items()}


@pytest.fixture(scope="module")
def report(rendered: dict[str, Rendered], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """checkov's report on every render, run once for the module (a few seconds)."""
    folder = tmp_path_factory.mktemp("renders")
    for name, r in rendered.items():
        (folder / f"{name}.yaml").write_text(r.text)
    return checkov.scan(folder)


def resource_id(o: dict[str, Any]) -> str:
    """An object as checkov names it: Kind.namespace.name (cluster-scoped: namespace `default`)."""
    return f"{o['kind']}.{o['metadata'].get('namespace', 'default')}.{o['metadata']['name']}"


def failed(report: dict) -> dict[str, list[str]]:
    """Each failed check id -> where it failed (resource, render)."""
    found: dict[str, list[str]] = {}
    for c in report["results"]["failed_checks"]:
        found.setdefault(c["check_id"], []).append(f"{c['resource']} ({c['file_path']})")
    return found


def skips() -> dict[str, str]:
    entries = yaml.safe_load(SKIPS.read_text())
    for check, reason in entries.items():
        assert re.fullmatch(r"CKV2?_K8S_\d+", check), f"{SKIPS.name}: {check} is no check id"
        assert isinstance(reason, str) and len(reason.split()) >= 8, f"{check}: give a reason"
    return entries


@pytest.mark.parametrize("version", kube_versions())
@pytest.mark.parametrize("name", RENDERS)
def test_objects_match_the_kubernetes_schemas(rendered, name: str, version: str) -> None:
    crds = [yaml.safe_load(p.read_text()) for p in sorted((CHART / "crds").glob("*.yaml"))]
    errors = []
    for o in rendered[name].objects + crds:
        where = f"{name}: {resource_id(o)} on Kubernetes {version}"
        if o["kind"] in CRD_KINDS:
            with pytest.raises(SchemaNotFoundError):
                kubernetes_validate.validate(o, version, strict=True)
            continue
        try:
            used = kubernetes_validate.validate(o, version, strict=True)
        except ValidationError as e:
            errors.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
            continue
        assert used == major_minor(version), f"{where}: validated with {used}'s schemas instead"
    assert not errors, "\n".join(errors)


def test_checkov_read_every_rendered_object(rendered, report) -> None:
    assert report["summary"]["parsing_errors"] == 0
    seen = {c["resource"] for kind in ("passed_checks", "failed_checks")
            for c in report["results"][kind]}
    objects = [o for r in rendered.values() for o in r.objects]
    assert {resource_id(o) for o in objects if o["kind"] not in UNCHECKED_BY_CHECKOV} <= seen
    assert not {s.split(".")[0] for s in seen} & UNCHECKED_BY_CHECKOV  # else: drop it above


def test_checkov_fails_no_check_outside_the_skip_list(report) -> None:
    unexpected = {check: where for check, where in failed(report).items() if check not in skips()}
    assert not unexpected, (
        f"checkov failed checks: fix the chart, or add the check to {SKIPS.name} with a reason: "
        + "; ".join(f"{check} on {', '.join(where)}" for check, where in unexpected.items()))


def test_every_checkov_skip_is_still_needed(report) -> None:
    stale = sorted(set(skips()) - set(failed(report)))
    assert not stale, f"{SKIPS.name}: {stale} fail nowhere any more: remove them"


@pytest.mark.parametrize("name", RENDERS)
def test_no_render_grants_cluster_wide_secret_access(rendered, name: str) -> None:
    for role in [o for o in rendered[name].objects if o["kind"] == "ClusterRole"]:
        for rule in role["rules"]:
            core = {"", "*"} & set(rule["apiGroups"])
            assert not (core and {"secrets", "*"} & set(rule["resources"])), f"{name}: {rule}"


# Watching all namespaces, a Role there reads Secrets and nothing else (the ClusterRole has the
# rest); watching a list, each watched namespace's Role has every right, Secret `get` included.
@pytest.mark.parametrize(("name", "namespaces", "watched"), [
    ("defaults", ["default"], False),  # rbac.secretNamespaces' default
    ("devObjectStore", ["codistill", "default"], False),  # where the dev store copies its Secret
    ("everything", ["team-a", "team-b"], True),  # team-c holds a copy but is not watched
])
def test_secret_get_is_granted_only_in_the_namespaces_runs_use(rendered, name: str,
                                                               namespaces: list[str],
                                                               watched: bool) -> None:
    r = rendered[name]
    ours = [o for o in r.objects if not o["metadata"]["name"].endswith("-leader")]  # its Lease
    roles = {o["metadata"]["namespace"]: o for o in ours if o["kind"] == "Role"}
    bindings = {o["metadata"]["namespace"]: o for o in ours if o["kind"] == "RoleBinding"}
    assert sorted(roles) == sorted(bindings) == namespaces
    for ns, role in roles.items():
        assert [rule for rule in role["rules"] if "secrets" in rule["resources"]] == [READ_SECRETS]
        others = [rule for rule in role["rules"] if rule != READ_SECRETS]
        assert bool(others) == watched, f"{name}/{ns}: {role['rules']}"
        binding = bindings[ns]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "codistill-operator",
                                        "namespace": NAMESPACE}]


class Forbidden:
    """An API whose Secret reads answer `status`, as the API server does without a grant."""

    def __init__(self, status: int):
        self.status = status

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        raise ApiException(status=self.status)


def test_a_forbidden_secret_read_names_the_secret_and_the_chart_value() -> None:
    with pytest.raises(MissingSecret) as refused:
        bucket.credentials(Forbidden(403), "team-x", "bucket-creds")
    message = str(refused.value)
    assert "\n" not in message and "team-x/bucket-creds" in message, message
    assert bucket.SECRET_NAMESPACES in message
    values: Any = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in bucket.SECRET_NAMESPACES.split("."):
        values = values[key]  # the value the message names exists, under that name
    assert values == ["default"]
    with pytest.raises(ApiException):  # only a 403 means "not granted"; others stay errors
        bucket.credentials(Forbidden(500), "team-x", "bucket-creds")

