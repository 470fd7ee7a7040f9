"""checkov, in a virtualenv of its own, and a scan of rendered Kubernetes manifests with it.

checkov pins boto3, pydantic, packaging... at versions the project's lock does not hold, so it
lives in .venv-checkov (gitignored), installed from requirements/checkov.lock. The lock's sha256
is stamped into the venv once the install succeeded: a venv half-built, or built from another
lock, is built again. `make checkov-venv` (which `make test` needs) runs this as a script, so the
install happens before the tests and outside their timeout; the chart scan calls it too, so a bare
`pytest` works on a fresh machine.

As a script: `python -m tests.support.checkov` builds the venv if needed and prints checkov's path.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import venv
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-checkov"
LOCK = ROOT / "requirements" / "checkov.lock"
STAMP = VENV / ".installed"
CHECKOV = VENV / "bin" / "checkov"


def ensure_checkov() -> Path:
    """The checkov executable of .venv-checkov, installed from the lock on first use."""
    want = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text() == want:
        return CHECKOV
    shutil.rmtree(VENV, ignore_errors=True)
    venv.EnvBuilder(with_pip=True).create(VENV)
    subprocess.run(
        [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "-r", str(LOCK)],
        check=True, timeout=900,
    )
    STAMP.write_text(want)
    return CHECKOV


def scan(folder: Path) -> dict[str, Any]:
    """checkov's JSON report on the Kubernetes manifests in `folder`, every check run.

    `--skip-download`: no call to checkov's platform (unreachable here, and not needed for the
    built-in checks). `--soft-fail`: failed checks exit 0, so a non-zero exit is checkov broken."""
    done = subprocess.run(
        [str(ensure_checkov()), "-d", str(folder), "--framework", "kubernetes",
         "--skip-download", "--soft-fail", "-o", "json"],
        capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"checkov failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


if __name__ == "__main__":
    print(ensure_checkov())
