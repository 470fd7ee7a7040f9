"""The `codistill` command (`commands`) and the local launcher behind `codistill run`: it runs
the PyTorchJobs the operator creates (`launch`), as the Training Operator would (`kubeflow`)."""

from .commands import main

__all__ = ["main"]
