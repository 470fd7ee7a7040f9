"""The `codistill` command (`commands`) and the local launcher behind `codistill run`: it runs the
same PyTorchJobs the operator creates (`launch`), the way the Training Operator would (`kubeflow`)."""

from .commands import main

__all__ = ["main"]
