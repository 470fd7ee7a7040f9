"""The contract package stays torch-free, and the operator imports only it (and kopf).

The operator image installs no torch: an `import torch` slipping into the contract, or the
operator reaching into the trainer, would break it; these tests fail first.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def loaded_after(statement: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after running `statement`."""
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in json.loads(out.stdout)}


@pytest.mark.parametrize("statement", [
    "import codistill.spec, codistill.names, codistill.storage, codistill.runfolder, "
    "codistill.pytorchjob, codistill.net",
    "import codistill_operator.handlers, codistill_operator.crd, codistill_operator.__main__",
])
def test_contract_and_operator_load_no_torch_and_no_trainer(statement: str) -> None:
    loaded = loaded_after(statement)
    assert "torch" not in loaded
    assert "codistill_trainer" not in loaded
