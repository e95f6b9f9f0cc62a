# The operator image: `ttsfleet operator`, run by the tts-operator chart.
# Not built here (this machine has no Docker engine); build it where one runs:
#   docker build -f operator.Dockerfile -t ttsfleet/operator:0.1.0 .
# Runs as the non-root user 65532 with a read-only root filesystem (the chart mounts
# an emptyDir at /tmp); the chart passes `operator --metrics-port 8080 --health-port 8081`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package needs to install: pyproject.toml pins every dependency.
COPY pyproject.toml README.md ./
COPY operator/ttsfleet ./operator/ttsfleet
RUN pip install . \
    && rm -rf /src \
    && groupadd --gid 65532 nonroot \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin nonroot

WORKDIR /tmp
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["ttsfleet"]
CMD ["operator"]
