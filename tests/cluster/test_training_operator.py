"""The Training Operator install the docs give (manifests/training-operator): it builds against
the real v1.9.4 manifests, and its init container template is the one the e2e runs with."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from cluster.controlplane import RESTRICTED_PYTORCH_INIT_CONTAINER, ControlPlane

ROOT = Path(__file__).resolve().parents[2]
OURS = ROOT / "manifests" / "training-operator"


def test_the_kustomization_patches_the_real_release(control_plane: ControlPlane,
                                                    tmp_path: Path) -> None:
    # the remote base, replaced by the same release, which cluster/build.sh keeps beside the
    # binary it built (no network here)
    upstream = control_plane.bin["training-operator"].parent / "release"
    shutil.copytree(upstream, tmp_path / "upstream")
    shutil.copytree(OURS, tmp_path / "ours")
    kustomization = tmp_path / "ours" / "kustomization.yaml"
    doc = yaml.safe_load(kustomization.read_text())
    (remote,) = doc["resources"]
    assert remote.endswith("manifests/overlays/standalone?ref=v1.9.4")
    doc["resources"] = ["../upstream/overlays/standalone"]
    kustomization.write_text(yaml.safe_dump(doc))
    built = list(yaml.safe_load_all(control_plane.kubectl("kustomize", str(tmp_path / "ours"))
                                    .stdout))
    (deployment,) = [o for o in built if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    flag = "--pytorch-init-container-template-file=/etc/codistill/pytorch-init-container.yaml"
    assert container["args"] == [flag] and container["command"] == ["/manager"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["pytorch-init"] == "/etc/codistill" and "cert" in mounts
    (config,) = [o for o in built if o["kind"] == "ConfigMap"
                 and o["metadata"]["name"] == "training-operator-pytorch-init"]
    assert config["metadata"]["namespace"] == "kubeflow"
    assert config["data"]["pytorch-init-container.yaml"] == RESTRICTED_PYTORCH_INIT_CONTAINER
