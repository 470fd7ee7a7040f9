"""The Helm chart and the plain manifests, checked with the real helm binary.

Renders the chart with its defaults and with each documented flag (a dry-run `helm install`, no
cluster), then checks what a cluster admin relies on: least-privilege RBAC, the restricted pod
security context, the operator's entry point and probes, the dev object store's Secret, the NOTES,
and that manifests/ and examples/ agree with the chart and the CRD.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from codistill import names, spec, trainjob
from codistill.pytorchjob import CONTAINER_SECURITY, POD_SECURITY
from tests.support.crdschema import as_json_schema
from tests.support.helm import (
    BUILT_IMAGE,
    CHART,
    CRD_NAME,
    MANIFESTS,
    NAMESPACE,
    ROOT,
    Helm,
    HelmUnavailable,
    Rendered,
    ensure_helm,
    expected_manifests,
    set_json,
)

# Each documented flag (docs/cluster.md) and a mix of them, on top of the one required value.
FLAGS: dict[str, dict[str, Any]] = {name: {**BUILT_IMAGE, **values} for name, values in {
    "defaults": {},
    "watchNamespaces": {"watchNamespaces": ["team-a", "team-b", "team-a"]},
    "serviceMonitor": {"metrics.serviceMonitor.enabled": True},
    "noMetricsService": {"metrics.service.enabled": False},
    "devObjectStore": {"devObjectStore.enabled": True},
    "existingServiceAccount": {"serviceAccount.create": False, "serviceAccount.name": "ops"},
    "noRbac": {"rbac.create": False},
    "mixed": {
        "watchNamespaces": ["team-a"],
        "devObjectStore.enabled": True,
        "devObjectStore.secretNamespaces": ["team-c"],
        "metrics.serviceMonitor.enabled": True,
        "image.tag": "0.2.0",
        "imagePullSecrets": [{"name": "registry"}],
    },
}.items()}
KNOWN = {
    ("v1", "ServiceAccount"), ("v1", "Service"), ("v1", "Secret"), ("apps/v1", "Deployment"),
    ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"), ("networking.k8s.io/v1", "NetworkPolicy"),
}
# The operator's and kopf's calls, exactly: (apiGroup, resource) -> verbs.
OPERATOR_RIGHTS = {
    ("codistill.io", "codistillations"): {"get", "list", "watch", "patch"},
    ("codistill.io", "codistillations/status"): {"patch"},
    ("kubeflow.org", "pytorchjobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("trainer.kubeflow.org", "trainjobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "events"): {"create"},
    ("", "pods"): {"list"},  # why a group's pods cannot start (status)
}
# A run's bucket credentials: only by namespaced Roles (test_chart_scan.py checks where).
SECRET_RIGHTS = {("", "secrets"): {"get"}}
# Cluster-wide only: kopf watches CRDs to notice a Training Operator installed later.
KOPF_CLUSTER_RIGHTS = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
LEADER = "codistill-operator-leader"  # the Role for the leader Lease (leader-election.yaml)
STANDARD_LABELS = ("name", "instance", "version", "component", "part-of", "managed-by")


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    try:
        binary = ensure_helm()
    except HelmUnavailable as e:
        pytest.skip(f"the real helm binary cannot be installed here: {e}")
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def render(helm: Helm) -> Callable[[str], Rendered]:
    """The chart rendered with FLAGS[name], once per session."""
    return cache(lambda name: helm.render(FLAGS[name]))


def kinds(r: Rendered, kind: str) -> list[dict[str, Any]]:
    return [o for o in r.objects if o["kind"] == kind]


def named(r: Rendered, kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in kinds(r, kind) if o["metadata"]["name"] == name]
    return found


def operator_pod(r: Rendered) -> dict[str, Any]:
    """The operator Deployment's pod spec."""
    return named(r, "Deployment", "codistill-operator")["spec"]["template"]["spec"]


def grants(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    found: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                found.setdefault((group, resource), set()).update(rule["verbs"])
    return found


@pytest.mark.parametrize("flag", FLAGS)
def test_lint_passes(helm: Helm, flag: str) -> None:
    done = helm.run("lint", "--strict", str(CHART), *set_json(FLAGS[flag]))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("flag", FLAGS)
def test_objects_are_known_labelled_and_namespaced(render, flag: str) -> None:
    r = render(flag)
    allowed_ns = {NAMESPACE, "default", "team-a", "team-b", "team-c"}
    for o in r.objects:
        where = f"{flag}: {o['kind']} {o['metadata'].get('name')}"
        assert (o["apiVersion"], o["kind"]) in KNOWN, where
        labels = o["metadata"]["labels"]
        for key in STANDARD_LABELS:
            assert labels.get(f"app.kubernetes.io/{key}"), f"{where}: no app.kubernetes.io/{key}"
        assert labels["app.kubernetes.io/instance"] == "codistill"
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] in allowed_ns, where


@pytest.mark.parametrize("flag", FLAGS)
def test_rbac_has_no_wildcards(render, flag: str) -> None:
    for o in kinds(render(flag), "Role") + kinds(render(flag), "ClusterRole"):
        for rule in o["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert not any("*" in item for item in rule[field]), f"{flag}: {rule}"


def test_rbac_watching_all_namespaces_is_one_cluster_role(render) -> None:
    r = render("defaults")
    (role,) = kinds(r, "ClusterRole")
    assert grants(role) == OPERATOR_RIGHTS | KOPF_CLUSTER_RIGHTS
    assert [grants(o) for o in kinds(r, "Role") if o["metadata"]["name"] != LEADER] == [
        SECRET_RIGHTS]  # in `default`
    (binding,) = kinds(r, "ClusterRoleBinding")
    assert binding["roleRef"]["kind"] == "ClusterRole"
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (sa,) = kinds(r, "ServiceAccount")
    account = sa["metadata"]["name"]
    subject = {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    assert binding["subjects"] == [subject]
    assert operator_pod(r)["serviceAccountName"] == account
    assert "--all-namespaces" in operator_pod(r)["containers"][0]["args"]


@pytest.mark.parametrize("flag", ["defaults", "watchNamespaces"])
def test_replicas_elect_a_leader_with_rights_to_its_lease_only(render, flag: str) -> None:
    r = render(flag)
    (role,) = [o for o in kinds(r, "Role") if o["metadata"]["name"] == LEADER]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "resourceNames": ["codistill-operator"], "verbs": ["get", "update"]}]
    (binding,) = [o for o in kinds(r, "RoleBinding") if o["metadata"]["name"] == LEADER]
    assert binding["roleRef"]["name"] == LEADER
    env = {e["name"]: e for e in operator_pod(r)["containers"][0]["env"]}
    assert env["CODISTILL_OPERATOR_LEASE_NAMESPACE"]["valueFrom"]["fieldRef"] == {
        "fieldPath": "metadata.namespace"}


def test_rbac_watching_a_list_is_a_role_per_namespace_and_nothing_cluster_wide(render) -> None:
    r = render("watchNamespaces")
    assert not kinds(r, "ClusterRole") and not kinds(r, "ClusterRoleBinding")
    roles = {o["metadata"]["namespace"]: o for o in kinds(r, "Role")
             if o["metadata"]["name"] != LEADER}
    bindings = {o["metadata"]["namespace"]: o for o in kinds(r, "RoleBinding")
                if o["metadata"]["name"] != LEADER}
    assert sorted(roles) == sorted(bindings) == ["team-a", "team-b"]
    for ns, role in roles.items():
        assert grants(role) == OPERATOR_RIGHTS | SECRET_RIGHTS
        assert bindings[ns]["roleRef"]["name"] == role["metadata"]["name"]
        assert bindings[ns]["subjects"][0]["namespace"] == NAMESPACE
    args = operator_pod(r)["containers"][0]["args"]
    assert "--all-namespaces" not in args
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == ["team-a", "team-b"]


def test_existing_service_account_and_no_rbac(render, helm: Helm) -> None:
    r = render("existingServiceAccount")
    assert not kinds(r, "ServiceAccount")
    assert operator_pod(r)["serviceAccountName"] == "ops"
    assert kinds(r, "ClusterRoleBinding")[0]["subjects"][0]["name"] == "ops"
    assert not [o for o in render("noRbac").objects if "Role" in o["kind"]]
    with pytest.raises(RuntimeError, match="serviceAccount.name is required"):
        helm.render({**BUILT_IMAGE, "serviceAccount.create": False})


@pytest.mark.parametrize("flag", FLAGS)
def test_every_pod_has_the_restricted_security_context(render, flag: str) -> None:
    for deployment in kinds(render(flag), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        where = f"{flag}: {deployment['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
        assert pod["enableServiceLinks"] is False, where  # CODISTILL_OPERATOR_*_PORT=tcp://...
        assert not any("hostPath" in v for v in pod.get("volumes", [])), where
        for c in pod["containers"] + pod.get("initContainers", []):
            ctx = c["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["capabilities"] == {"drop": ["ALL"]}, where
            assert not ctx.get("privileged"), where
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], where


def test_operator_deployment_runs_the_entry_point_with_probes(render) -> None:
    d = named(render("defaults"), "Deployment", "codistill-operator")
    assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"] == {"type": "RollingUpdate"}
    pod = d["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "localhost:5000/codistill/operator:0.1.0"
    # runs that omit spec.image get the trainer image pushed beside the operator's
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env[spec.TRAINER_IMAGE_ENV] == "localhost:5000/codistill/trainer:0.1.0"
    assert env["CODISTILL_OPERATOR_BIND_ADDRESS"] == "0.0.0.0"  # "::" on IPv6-only clusters
    assert c["command"] == ["python", "-m", "codistill_operator"]
    args = c["args"]
    assert args[args.index("--liveness-port") + 1] == "8080"
    assert args[args.index("--metrics-port") + 1] == "9090"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"healthz": 8080, "metrics": 9090}
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8080
    selector = d["spec"]["selector"]["matchLabels"]
    assert selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    mixed = operator_pod(render("mixed"))
    assert mixed["containers"][0]["image"] == "localhost:5000/codistill/operator:0.2.0"
    trainer = {"name": spec.TRAINER_IMAGE_ENV, "value": "localhost:5000/codistill/trainer:0.2.0"}
    assert trainer in mixed["containers"][0]["env"]
    assert mixed["imagePullSecrets"] == [{"name": "registry"}]


def test_metrics_service_and_service_monitor_reach_the_operator(render, helm: Helm) -> None:
    r = render("serviceMonitor")
    operator = named(r, "Deployment", "codistill-operator")
    pod_labels = operator["spec"]["template"]["metadata"]["labels"]
    (svc,) = kinds(r, "Service")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    (monitor,) = kinds(r, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert not kinds(render("defaults"), "ServiceMonitor")
    assert not kinds(render("noMetricsService"), "Service")
    with pytest.raises(RuntimeError, match="needs metrics.service.enabled"):
        helm.render({**BUILT_IMAGE, "metrics.service.enabled": False,
                     "metrics.serviceMonitor.enabled": True})


def test_dev_object_store_gives_runs_a_bucket_secret_and_says_where(render, helm: Helm) -> None:
    r = render("devObjectStore")
    secrets = kinds(r, "Secret")
    assert sorted(s["metadata"]["namespace"] for s in secrets) == ["codistill", "default"]
    assert all(s["metadata"]["name"] == "codistill-bucket" for s in secrets)
    assert all(tuple(s["data"]) == names.CREDENTIAL_KEYS for s in secrets)
    assert secrets[0]["data"] == secrets[1]["data"]  # one generated key pair, copied
    assert len(base64.b64decode(secrets[0]["data"]["AWS_SECRET_ACCESS_KEY"])) >= 8
    (minio,) = named(r, "Deployment", "codistill-minio")["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in minio["env"]} == {
        "MINIO_ROOT_USER": {"name": "codistill-bucket", "key": "AWS_ACCESS_KEY_ID"},
        "MINIO_ROOT_PASSWORD": {"name": "codistill-bucket", "key": "AWS_SECRET_ACCESS_KEY"},
    }
    assert named(r, "Service", "codistill-minio")["spec"]["ports"][0]["port"] == 9000
    for line in ("url: s3://codistill", "endpoint: http://codistill-minio.codistill.svc:9000",
                 "credentialsSecret: codistill-bucket"):
        assert line in r.notes
    assert sorted(s["metadata"]["namespace"] for s in kinds(render("mixed"), "Secret")) == [
        "codistill", "team-a", "team-c"]
    given = helm.render({**BUILT_IMAGE, "devObjectStore.enabled": True,
                         "devObjectStore.accessKey": "me",
                         "devObjectStore.secretKey": "long-enough"})
    data = kinds(given, "Secret")[0]["data"]
    assert base64.b64decode(data["AWS_SECRET_ACCESS_KEY"]) == b"long-enough"
    with pytest.raises(RuntimeError, match="at least 8 characters"):
        helm.render({**BUILT_IMAGE, "devObjectStore.enabled": True,
                     "devObjectStore.secretKey": "short"})


def test_notes_tell_the_next_command(render) -> None:
    notes = render("defaults").notes
    assert "kubectl apply -n default -f examples/quickstart.yaml" in notes
    assert "rollout status deployment/codistill-operator" in notes
    assert "--set devObjectStore.enabled=true" in notes
    notes = render("watchNamespaces").notes
    assert "team-a, team-b" in notes and "kubectl get -n team-a codistillations -w" in notes
    notes = render("devObjectStore").notes
    assert "kubectl apply -n default -f manifests/samples/codistillation.yaml" in notes


def test_the_chart_runs_only_images_the_user_built(helm: Helm) -> None:
    """No default image: nobody publishes codistill's, and a public name we do not own could
    serve anyone's image, with the operator's rights. The trainer's defaults to beside it."""
    with pytest.raises(RuntimeError, match=re.escape(
            "image.repository: required: set it to where `make images REGISTRY=...` pushed the "
            "operator image, e.g. --set image.repository=localhost:5000/codistill/operator")):
        helm.render()
    with pytest.raises(RuntimeError, match=re.escape(
            "trainerImage.repository: required when image.repository does not end in /operator")):
        helm.render({"image.repository": "registry.example.com/ops"})
    r = helm.render({"image.repository": "registry.example.com/ops",
                     "trainerImage.repository": "registry.example.com/train",
                     "trainerImage.tag": "2.0"})
    (c,) = operator_pod(r)["containers"]
    assert c["image"] == "registry.example.com/ops:0.1.0"
    assert {"name": spec.TRAINER_IMAGE_ENV, "value": "registry.example.com/train:2.0"} in c["env"]
    assert "Runs that omit spec.image run registry.example.com/train:2.0." in r.notes
    pinned = helm.render({"image.repository": "r.example.com/codistill/operator",
                          "image.tag": "1.0@sha256:" + "a" * 64})
    (c,) = operator_pod(pinned)["containers"]
    assert c["image"] == "r.example.com/codistill/operator:1.0@sha256:" + "a" * 64
    assert {"name": spec.TRAINER_IMAGE_ENV, "value": "r.example.com/codistill/trainer:1.0"} in \
        c["env"]  # the operator's digest is not the trainer's


def test_plain_manifests_claim_no_helm_release() -> None:
    """kubectl applies them: labels saying Helm manages them would be false, and a later
    `helm install` refuses to adopt objects that carry them without its release annotations."""
    text = (MANIFESTS / "operator.yaml").read_text()
    assert "helm.sh/chart" not in text and "managed-by: Helm" not in text
    assert "app.kubernetes.io/name: codistill" in text  # the other labels stay


def documented_commands(path: Path, *starts: str) -> list[str]:
    """The commands of a markdown file's sh/bash blocks that start with one of `starts`, in
    order, continuation lines joined."""
    blocks = "".join(re.findall(r"```(?:sh|bash)\n(.*?)```", path.read_text(), re.S))
    lines = blocks.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip().startswith(starts)]


@pytest.mark.parametrize("doc", ["README.md", "docs/cluster.md"])
def test_documented_installs_need_only_namespaces_created_before(helm: Helm, doc: str) -> None:
    """Each documented `helm install` renders (it names the image the user built) and puts
    objects only in namespaces that exist by then: Helm creates none but the release's, and an
    install into a missing one fails half-way."""
    created, installs = {"default"}, 0
    for line in documented_commands(ROOT / doc, "kubectl create namespace", "helm install"):
        args = shlex.split(line, comments=True)
        if args[1] == "create":
            created.update(args[3:])
            continue
        if "charts/codistill" not in args:  # another chart (Kubeflow Trainer's), not ours
            continue
        installs += 1
        if "--create-namespace" in args:
            created.add(args[args.index("-n") + 1])
        flags = [str(CHART) if a == "charts/codistill" else a
                 for a in args[2:] if a != "--create-namespace"]
        done = helm.run("template", *flags)
        assert done.returncode == 0, f"{doc}: `{line}`: {done.stderr.strip()}"
        used = {o["metadata"].get("namespace") for o in yaml.safe_load_all(done.stdout) if o}
        missing = sorted(used - created - {None})
        assert not missing, f"{doc}: `{line}` installs into {missing} before they are created"
    assert installs, f"{doc}: no helm install"


UNINSTALL = ("kubectl delete codistillations --all -A", "helm uninstall codistill -n codistill",
             "kubectl delete crd codistillations.codistill.io")


def test_uninstall_deletes_the_runs_while_the_operator_runs(render) -> None:
    """A run with `storage.onDelete: Delete` carries a finalizer only the operator removes:
    deleted after `helm uninstall`, it (and the CRD, and its namespace) would hang."""
    for where, text in [("NOTES.txt", render("defaults").notes),
                        ("README.md", (ROOT / "README.md").read_text()),
                        ("docs/cluster.md", (ROOT / "docs" / "cluster.md").read_text())]:
        at = [text.find(step) for step in UNINSTALL]
        assert -1 not in at and at == sorted(at), f"{where}: uninstall is not {UNINSTALL}"


def test_schema_refuses_misspelt_and_invalid_values(helm: Helm) -> None:
    with pytest.raises(RuntimeError, match="watchNamespace"):
        helm.render({**BUILT_IMAGE, "watchNamespace": ["team-a"]})
    with pytest.raises(RuntimeError, match="Not_A_Namespace"):
        helm.render({**BUILT_IMAGE, "watchNamespaces": ["Not_A_Namespace"]})
    with pytest.raises(RuntimeError, match="pullPolicy"):
        helm.render({**BUILT_IMAGE, "image.pullPolicy": "Sometimes"})


def test_manifests_are_the_chart_rendered(helm: Helm) -> None:
    if not (MANIFESTS / "crd.yaml").is_file():
        pytest.fail("manifests/crd.yaml is missing: run `make manifests`")
    for path, text in expected_manifests(helm).items():
        assert path.is_file() and path.read_text() == text, (
            f"{path.relative_to(ROOT)} drifted from the chart: run `make manifests`")
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [CRD_NAME]


def crd_validator() -> jsonschema.Draft4Validator:
    if not (MANIFESTS / "crd.yaml").is_file():
        pytest.fail("manifests/crd.yaml is missing: run `make manifests`")
    crd = yaml.safe_load((MANIFESTS / "crd.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == spec.API_VERSION]
    schema = as_json_schema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def runs_in(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == spec.KIND]


RUN_FILES = [
    p for p in sorted(ROOT.glob("examples/*.yaml")) + sorted(MANIFESTS.glob("samples/*.yaml"))
    if runs_in(p)
]


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_run_manifests_validate_against_the_crd(path: Path) -> None:
    validator = crd_validator()
    for doc in runs_in(path):
        validator.validate(doc)
        spec.parse(doc, str(path))


def test_crd_schema_refuses_a_bad_run() -> None:
    (doc,) = runs_in(MANIFESTS / "samples" / "codistillation.yaml")
    validator = crd_validator()
    validator.validate(doc)
    cases = [("groups", 0, "less than the minimum"), ("trainig", {"steps": 9}, "'trainig' was unexp")]
    for field, bad, why in cases:
        wrong = {**doc, "spec": {**doc["spec"], field: bad}}
        with pytest.raises(jsonschema.ValidationError, match=why):
            validator.validate(wrong)


def test_sample_run_uses_the_dev_object_store(render) -> None:
    (doc,) = runs_in(MANIFESTS / "samples" / "codistillation.yaml")
    notes = render("devObjectStore").notes
    for key, value in doc["spec"]["storage"].items():
        assert f"{key}: {value}" in notes
    assert "image" not in doc["spec"]  # the operator's trainer image, never a public name
    # Named apart from the dev store's: `kubectl apply -f manifests/samples/` keeps its keys.
    store = {s["metadata"]["name"] for s in kinds(render("devObjectStore"), "Secret")}
    secret = yaml.safe_load((MANIFESTS / "samples" / "bucket-secret.yaml").read_text())
    assert secret["metadata"]["name"] not in store
    assert tuple(secret["stringData"]) == names.CREDENTIAL_KEYS


def documented_values() -> tuple[set[str], set[str]]:
    """Every key path in values.yaml, and those with a `# --` comment right above them."""
    paths: set[str] = set()
    documented: set[str] = set()
    stack: list[tuple[int, str]] = []
    doc = False  # inside a `# --` comment (its continuation lines included)
    for line in (CHART / "values.yaml").read_text().splitlines():
        if line.strip().startswith("#"):
            doc = doc or line.strip().startswith("# --")
            continue
        if m := re.match(r"^(\s*)(\w+):", line):
            indent = len(m.group(1))
            stack = [(i, k) for i, k in stack if i < indent] + [(indent, m.group(2))]
            path = ".".join(k for _, k in stack)
            paths.add(path)
            if doc:
                documented.add(path)
        doc = False
    return paths, documented


def test_every_value_is_documented_in_values_yaml_and_docs() -> None:
    paths, documented = documented_values()
    for path in paths:  # a documented key covers its parents and its children
        covered = [d for d in documented if f"{path}.".startswith(f"{d}.") or d.startswith(path)]
        assert covered, f"values.yaml: {path} has no `# --` comment"
    table = (ROOT / "docs" / "cluster.md").read_text()
    missing = sorted(p for p in documented if f"`{p}`" not in table)
    assert not missing, f"docs/cluster.md: values table lacks {missing}"


TRAINER_V2 = ("trainer.kubeflow.org/v1alpha1/ClusterTrainingRuntime",)


def runtimes(rendered: Rendered) -> list[dict[str, Any]]:
    return [o for o in rendered.objects if o["kind"] == "ClusterTrainingRuntime"]


def test_the_trainjob_runtime_is_installed_where_trainer_v2_serves_it_and_fits_the_trainjobs(
        helm: Helm) -> None:
    assert runtimes(helm.render(BUILT_IMAGE)) == []  # no Trainer v2: nothing it cannot apply
    rendered = helm.render(BUILT_IMAGE, TRAINER_V2)
    (runtime,) = runtimes(rendered)
    assert runtime["metadata"]["name"] == spec.DEFAULT_TRAINJOB_RUNTIME
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}
    template = runtime["spec"]["template"]["spec"]
    assert template["failurePolicy"] == {"maxRestarts": 1}
    (node,) = template["replicatedJobs"]  # what the operator's runtime patch names
    assert node["name"] == names.TRAINJOB_REPLICATED_JOB
    assert node["template"]["metadata"]["labels"] == {
        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    assert node["template"]["spec"]["backoffLimit"] == 6
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["securityContext"] == POD_SECURITY and pod["restartPolicy"] == "OnFailure"
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    (container,) = pod["containers"]
    assert container["name"] == names.TRAINJOB_CONTAINER
    assert container["command"] == trainjob.COMMAND
    assert container["securityContext"] == CONTAINER_SECURITY
    (deployment,) = [o for o in rendered.objects if o["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"][
        "containers"][0]["env"]}
    assert env[spec.TRAINJOB_RUNTIME_ENV] == "codistill"
    assert container["image"] == env[spec.TRAINER_IMAGE_ENV]
    mine = helm.render({**BUILT_IMAGE, "trainJobRuntime.create": False,
                        "trainJobRuntime.name": "team-torch"}, TRAINER_V2)
    assert runtimes(mine) == []
    (deployment,) = [o for o in mine.objects if o["kind"] == "Deployment"]
    assert {"name": spec.TRAINJOB_RUNTIME_ENV, "value": "team-torch"} in deployment["spec"][
        "template"]["spec"]["containers"][0]["env"]
