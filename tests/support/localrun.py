"""Helpers for tests that run `codistill run` for real: tiny manifests and process inspection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .datafixtures import make_tiny_data


def manifest(tmp: Path, name: str = "t", **spec: Any) -> Path:
    """A small, fast Codistillation on the tiny LM fixture, written to `tmp/<name>.yaml`."""
    data = make_tiny_data(tmp / "data")
    doc = {
        "apiVersion": "codistill.io/v1alpha1",
        "kind": "Codistillation",
        "metadata": {"name": name},
        "spec": {
            "groups": 2,
            "workersPerGroup": 2,
            "task": {"name": "lm", "args": {"data_dir": str(data), "seq_len": 16, "embed": 16,
                                            "hidden": 32}},
            "training": {"steps": 80, "batchSize": 8, "evalEverySteps": 20, "evalBatches": 2,
                         "checkpointEverySteps": 20, "optimizer": {"lr": 0.01}},
            "distillation": {"burnInSteps": 10, "exchangeEverySteps": 10, "reloadEverySteps": 10,
                             "maxStalenessSteps": 200, "pollIntervalSeconds": 0.05},
            **spec,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def codistill(*args: str, cwd: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "codistill_trainer", *args], cwd=cwd, text=True,
                          capture_output=True, **kw)


def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "codistill_trainer", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def workers_of(run_url: str) -> dict[int, dict[str, str]]:
    """Live trainer processes whose env names this run folder: {pid: env}."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            raw = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        env = dict(v.decode(errors="replace").partition("=")[::2] for v in raw if b"=" in v)
        if env.get("CODISTILL_RUN_URL") == run_url and state != "Z":
            found[int(proc.name)] = env
    return found


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
