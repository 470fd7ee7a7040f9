"""The codistill operator: `Codistillation` resources become one Kubeflow PyTorchJob per group.

Run it with `python -m codistill_operator` (see `__main__`) or `kopf run -m
codistill_operator.handlers`. The CRD is generated from the run spec by `codistill_operator.crd`.
Nothing here imports torch.
"""
