"""The real-Kubernetes test tier: a control plane built from Go modules (controlplane), and the
process kubelet that runs pods as local processes. See cluster/README.md."""
