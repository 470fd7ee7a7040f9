"""`make images` (scripts/images.sh): the build and push commands it runs, and what it refuses.

This machine has no container engine (at most a docker client with no daemon), so no image can be
built here: each test puts fake `docker` / `podman` / `buildah` scripts, which only record their
argv, on a PATH that holds nothing else, and checks the exact commands. That is the real test
possible here; building the images themselves needs an engine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.helm import CHART, ROOT

SCRIPT = ROOT / "scripts" / "images.sh"
BASH = shutil.which("bash") or "/bin/bash"
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def fake_tools(tmp_path: Path, *tools: str) -> Path:
    """A folder holding only fake container tools that append `<tool> <argv>` to tmp_path/log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        fake = bin_dir / tool
        fake.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path / "log"}"\n')
        fake.chmod(0o755)
    return bin_dir


def images(tmp_path: Path, *tools: str,
           **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the script with only `tools` on PATH; its result and the commands the tools got."""
    done = subprocess.run([BASH, str(SCRIPT)], capture_output=True, text=True, timeout=30,
                          env={"PATH": str(fake_tools(tmp_path, *tools)), **env})
    log = tmp_path / "log"
    return done, log.read_text().splitlines() if log.exists() else []


def builds(tool: str, registry: str, tag: str, *extra: str) -> list[str]:
    return [f"{tool} build {' '.join(extra + ('--target', target))} "
            f"-t {registry}/codistill/{target}:{tag} ." for target in ("operator", "trainer")]


@pytest.mark.parametrize(("tools", "used"), [
    (("docker", "podman", "buildah"), "docker"),
    (("podman", "buildah"), "podman"),
    (("buildah",), "buildah"),
])
def test_builds_both_targets_with_the_first_tool_found(tmp_path: Path, tools, used) -> None:
    done, commands = images(tmp_path, *tools, REGISTRY="localhost:5000")
    assert done.returncode == 0, done.stderr
    assert commands == builds(used, "localhost:5000", APP_VERSION)  # TAG: the chart's appVersion
    assert done.stdout.splitlines() == [f"images: localhost:5000/codistill/{t}:{APP_VERSION}"
                                        for t in ("operator", "trainer")]


def test_push_pushes_both_once_both_are_built(tmp_path: Path) -> None:
    done, commands = images(tmp_path, "podman", REGISTRY="ghcr.io/you/", TAG="1.2", PUSH="1")
    assert done.returncode == 0, done.stderr
    assert commands == builds("podman", "ghcr.io/you", "1.2") + [
        "podman push ghcr.io/you/codistill/operator:1.2",
        "podman push ghcr.io/you/codistill/trainer:1.2",
    ]


def test_a_release_build_pins_the_base_image_by_digest(tmp_path: Path) -> None:
    base = "python:3.11.13-slim-bookworm@sha256:" + "0" * 64
    done, commands = images(tmp_path, "docker", REGISTRY="r", TAG="t", PYTHON_IMAGE=base)
    assert done.returncode == 0, done.stderr
    assert commands == builds("docker", "r", "t", "--build-arg", f"PYTHON_IMAGE={base}")


@pytest.mark.parametrize(("env", "tools", "message"), [
    ({}, ("docker",), "images: set REGISTRY= to where the images go, e.g. "
                      "REGISTRY=localhost:5000 or REGISTRY=ghcr.io/you"),
    ({"REGISTRY": "r"}, (), "images: no container tool found: install docker, podman or buildah"),
    ({"REGISTRY": "r", "PUSH": "yes"}, ("docker",),
     "images: PUSH: expected 1 (push) or empty, got 'yes'"),
], ids=["no REGISTRY", "no tool", "bad PUSH"])
def test_refuses_with_one_line_saying_what_to_do(tmp_path: Path, env, tools, message) -> None:
    done, commands = images(tmp_path, *tools, **env)
    assert done.returncode != 0
    assert done.stderr == message + "\n"
    assert commands == []  # nothing built, nothing pushed


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_images_runs_the_script(tmp_path: Path) -> None:
    bin_dir = fake_tools(tmp_path, "docker")  # first on PATH: shadows any real docker
    done = subprocess.run(["make", "-s", "images", "REGISTRY=r", "TAG=t", "PUSH=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "log").read_text().splitlines() == builds("docker", "r", "t") + [
        "docker push r/codistill/operator:t", "docker push r/codistill/trainer:t"]
