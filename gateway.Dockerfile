# The speech gateway image: `ttsfleet gateway`, run by the operator for each TtsGateway.
# Not built here (this machine has no Docker engine); build it where one runs:
#   docker build -f gateway.Dockerfile -t ttsfleet/gateway:0.1.0 .
# Runs as the non-root user 65532 with a read-only root filesystem; the operator passes
# `gateway --config=/etc/ttsfleet/gateway/gateway.json --port=8080` and mounts the
# config (a ConfigMap) and the JWKS (a Secret). Ships PyAV's FFmpeg build (GPL-2.0+,
# with libmp3lame): see README.md, Licences.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ttsfleet ./operator/ttsfleet
RUN pip install '.[gateway]' \
    && rm -rf /src \
    && groupadd --gid 65532 nonroot \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin nonroot

WORKDIR /tmp
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["ttsfleet"]
CMD ["gateway", "--config=/etc/ttsfleet/gateway/gateway.json"]
