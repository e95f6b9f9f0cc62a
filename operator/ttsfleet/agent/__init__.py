"""The node agent: reads NVML on a GPU node and publishes what it finds.

It publishes `ttsfleet.io/` annotations on its own Node and Prometheus metrics.
It only reads: it never changes MIG configuration and never writes `nvidia.com/`
labels (NVIDIA's MIG manager and GPU Feature Discovery own those).
"""
