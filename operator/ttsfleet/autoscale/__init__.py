"""Autoscaling: the pure policy (`policy.recommend`) and, later, its Prometheus loop."""
