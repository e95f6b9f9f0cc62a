"""ttsfleet: a Kubernetes operator for GPU text-to-speech fleets on NVIDIA Triton."""

__version__ = "0.1.0"
