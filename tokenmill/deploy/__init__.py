"""Running tokenmill past one machine: Ray Serve (`tokenmill.deploy.ray`); Kubernetes manifests
live in the repository's deploy/k8s/ folder."""
