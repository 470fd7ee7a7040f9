"""Server-side printing, as the real API server does it for a CRD's additionalPrinterColumns.

`kubectl get` asks for `application/json;as=Table` and prints the columns the server sends; the
columns come from the CRD itself (manifests/crd.yaml), so what `kubectl get codistillations`
shows here is what a cluster shows.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import yaml

CRD = Path(__file__).resolve().parents[2] / "manifests" / "crd.yaml"


def printer_columns(crd: Path = CRD) -> list[dict[str, Any]]:
    doc = yaml.safe_load(crd.read_text())
    served = next(v for v in doc["spec"]["versions"] if v.get("served"))
    return served.get("additionalPrinterColumns", [])


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def _path(obj: Any, json_path: str) -> Any:
    """Simple JSONPath (`.a.b.c`), all that printer columns here use."""
    for key in json_path.strip(".").split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def _age(stamp: str | None) -> str:
    if not stamp:
        return "<unknown>"
    then = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _cell(obj: dict[str, Any], column: dict[str, Any]) -> Any:
    value = _path(obj, column["jsonPath"])
    return _age(value) if column["type"] == "date" else value


def table(objects: list[dict[str, Any]], columns: list[dict[str, Any]]) -> dict[str, Any]:
    """A meta.k8s.io/v1 Table: Name first, then the CRD's columns, one row per object."""
    defs = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
             "description": "Name of the resource"}]
    defs += [{"name": c["name"], "type": c["type"], "format": c.get("format", ""),
              "priority": c.get("priority", 0), "description": c.get("description", "")}
             for c in columns]
    rows = [{"cells": [o["metadata"]["name"], *(_cell(o, c) for c in columns)],
             "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                        "metadata": o["metadata"]}}
            for o in objects]
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {},
            "columnDefinitions": defs, "rows": rows}
