"""The Dockerfile, checked without a Docker engine (there is none here).

What can be known without building: both targets exist, base images are pinned tags, each image
runs the project's own entry points (which must exist in the package), as a numeric non-root user,
installs only its own extra with versions from the lock, and the build context holds what it copies.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from codistill import pytorchjob
from codistill_trainer import datasets
from codistill_trainer.cli import commands as cli

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9_.\[\]-]+)==(\S+)$")


@dataclass
class Stage:
    name: str
    base: str
    lines: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, rest)

    def last(self, instruction: str) -> str:
        found = [rest for ins, rest in self.lines if ins == instruction]
        assert found, f"Dockerfile: stage {self.name} has no {instruction}"
        return found[-1]

    def all(self, instruction: str) -> list[str]:
        return [rest for ins, rest in self.lines if ins == instruction]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
    out = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            ins, _, rest = line.strip().partition(" ")
            out.append((ins.upper(), rest.strip()))
    return out


def parse() -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults (resolved) and the stages by name."""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    for ins, rest in instructions((ROOT / "Dockerfile").read_text()):
        if ins == "ARG" and not stages:
            key, _, value = rest.partition("=")
            args[key] = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value)
        elif ins == "FROM":
            image, name = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE).groups()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
            stages[name] = Stage(name, base)
        else:
            list(stages.values())[-1].lines.append((ins, rest))
    return args, stages


def exec_form(rest: str) -> list[str]:
    return json.loads(rest) if rest.startswith("[") else shlex.split(rest)


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse()[1]


def test_targets_exist_and_bases_are_pinned_tags(stages: dict[str, Stage]) -> None:
    assert {"operator", "trainer"} <= stages.keys()
    for stage in stages.values():
        if stage.base in stages:
            continue
        image, _, tag = stage.base.rpartition(":")
        pinned = image and re.search(r"\d+\.\d+\.\d+", tag) and "latest" not in tag
        assert pinned, f"Dockerfile stage {stage.name}: base {stage.base} is not a pinned tag"


def test_images_run_as_a_numeric_non_root_user_the_chart_expects(stages: dict[str, Stage]) -> None:
    helpers = (ROOT / "charts" / "codistill" / "templates" / "_helpers.tpl").read_text()
    (chart_uid,) = re.findall(r"runAsUser: (\d+)", helpers)
    for target in ("operator", "trainer"):
        user, _, group = stages[target].last("USER").partition(":")
        assert user.isdigit() and int(user) > 0, f"{target}: USER {user} must be a non-zero uid"
        assert user == chart_uid and group == chart_uid


def test_operator_runs_its_entry_point_without_torch(stages: dict[str, Stage]) -> None:
    entry = exec_form(stages["operator"].last("ENTRYPOINT"))
    assert entry == ["python", "-m", "codistill_operator"]
    assert (ROOT / "operator" / "codistill_operator" / "__main__.py").is_file()
    flags = exec_form(stages["operator"].last("CMD"))
    assert "--all-namespaces" in flags and flags[flags.index("--liveness-port") + 1] == "8080"
    installs = " ".join(stages["operator-venv"].all("RUN"))
    assert '"/src[operator]"' in installs and "[trainer]" not in installs
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    shipped = project["dependencies"] + project["optional-dependencies"]["operator"]
    assert not [d for d in shipped if d.startswith("torch")]


def test_trainer_runs_the_worker_and_bakes_in_the_data(stages: dict[str, Stage]) -> None:
    trainer = stages["trainer"]
    assert exec_form(trainer.last("CMD")) == pytorchjob.WORKER_COMMAND
    assert (ROOT / "trainer" / "codistill_trainer" / "worker.py").is_file()
    env = " ".join(trainer.all("ENV"))
    assert f"{datasets.ENV_DATA}=/opt/codistill/data" in env
    runs = trainer.all("RUN")
    assert any(r.startswith("codistill data fetch") for r in runs)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["codistill"] == "codistill_trainer.cli:main"
    assert cli.parser().parse_args(["data", "fetch"]).fn is cli.cmd_data
    installs = " ".join(runs)
    assert '"/src[trainer]"' in installs
    assert "${TORCH_INDEX_URL}" in installs
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert "TRAINER_BASE" in parse()[0]


def normal(name: str) -> str:
    """A distribution name as PEP 503 compares them (`prometheus_client` == `prometheus-client`)."""
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def test_installs_are_pinned_by_the_lock_and_it_agrees_with_pyproject(
    stages: dict[str, Stage],
) -> None:
    for target in ("operator-venv", "trainer"):
        assert "-c /src/requirements/all.lock" in " ".join(stages[target].all("RUN")), target
    lock = dict(PIN.match(line).groups() for line in
                (ROOT / "requirements" / "all.lock").read_text().split())
    locked = {normal(name): version for name, version in lock.items()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for group, deps in [("dependencies", project["dependencies"]),
                        ("operator", extras["operator"]), ("trainer", extras["trainer"])]:
        for dep in deps:
            m = PIN.match(dep)
            assert m, f"pyproject.toml {group}: {dep!r} is not an exact pin"
            got = locked.get(normal(m.group(1)))
            assert got == m.group(2), f"pyproject.toml {group}: {dep} but all.lock has {got}"


def test_build_context_holds_what_the_dockerfile_copies(stages: dict[str, Stage]) -> None:
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore must be an allowlist (start with `*`)"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = [src for s in stages.values() for rest in s.all("COPY") if "--from" not in rest
              for src in shlex.split(rest)[:-1]]
    assert copied
    for src in copied:
        assert src.rstrip("/") in allowed, f".dockerignore excludes {src}, which is copied"
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which does not exist"
