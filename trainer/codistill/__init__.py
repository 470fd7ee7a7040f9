"""codistill's contract: what the operator, the launcher and the trainer must agree on.

Torch-free by rule (a test enforces it): the run spec (`spec`), the names of everything shared
(`names`: API group, labels, env variables, bucket paths), the bucket (`storage`), the run
folder's files and their schemas (`runfolder`), and the rendering of each group's Kubeflow job
(`pytorchjob`). The operator image imports only this package and kopf; the trainer builds on it.
See docs/architecture.md.
"""
