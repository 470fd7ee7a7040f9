"""The real control plane tier: kube-apiserver, kube-controller-manager and the Kubeflow Training
Operator built from their Go modules (cluster/), run on loopback."""
