"""What the project promises others: the CRD, the chart, the images, the Kubeflow contract."""
