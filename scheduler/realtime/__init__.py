"""The real-time lane: deployment configs and store, the controller that keeps replicas,
the router on the predict path, serving metrics, the deployment service."""
