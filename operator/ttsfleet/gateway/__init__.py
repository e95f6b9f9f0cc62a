"""The speech gateway: the OpenAI-compatible API in front of every fleet (in progress).

`auth`: JWT bearer tokens checked against a key set, verified tokens cached until they
expire. The HTTP service, its Triton and Kubernetes adapters come next.
"""
