"""What a run on a cluster needs beyond the schema: one check for the operator and the CLI.

`codistill validate` and `codistill render` run it before a manifest goes near a cluster, and the
operator runs it on every resource it reconciles, so the two can never disagree. Every message
starts with the field it is about (`spec.storage.url: ...`), like `spec.parse`'s.
"""

from __future__ import annotations

import re
from typing import Any

import fsspec

from .spec import Codistillation, SpecError, parse, short

LOCAL_ONLY = {"file", "local", "memory"}  # no two pods share these
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
POD_TEMPLATE_KEYS = {"metadata", "spec"}


def _storage(run: Codistillation) -> str | None:
    url = run.spec.storage.url
    if not url:
        return "spec.storage.url: required on a cluster: a bucket all pods reach, e.g. s3://bucket"
    protocol = url.split("://", 1)[0]
    if protocol in LOCAL_ONLY:
        return f"spec.storage.url: {protocol}:// is for local runs only; pods need a shared bucket"
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError):
        return f"spec.storage.url: storage protocol '{protocol}' is unknown to the operator"
    return None


def _queue(run: Codistillation) -> str | None:
    name = run.spec.run_policy.queue_name
    if name is not None and (len(name) > 63 or not LABEL_VALUE.fullmatch(name)):
        return (f"spec.runPolicy.queueName: must be a label value (<= 63 characters), "
                f"got {short(repr(name))}")
    return None


def _template(run: Codistillation) -> str | None:
    template = run.spec.template or {}
    unknown = sorted(set(template) - POD_TEMPLATE_KEYS)
    if unknown:
        return (f"spec.template: a pod template has only metadata and spec, "
                f"got {short(str(unknown))}")
    # spec.parse checked the shape: containers is a list of mappings
    containers = (template.get("spec") or {}).get("containers") or []
    for i, container in enumerate(containers):
        if not container.get("name"):
            return f"spec.template.spec.containers[{i}].name: required"
    return None


def check(body: dict[str, Any], source: str) -> Codistillation:
    """The parsed run, fit for a cluster, or SpecError naming every field that is wrong.

    JSON types are checked strictly (by `spec.parse`, "yes" is no boolean), as the CRD's schema
    does: the operator must not accept what `kubectl apply` would refuse.
    """
    run = parse(body, source)
    problems = [p for p in (_storage(run), _queue(run), _template(run)) if p]
    if problems:
        raise SpecError(f"{source}: {'; '.join(problems)}")
    return run
