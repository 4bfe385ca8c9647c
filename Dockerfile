# kithara-ops: train, resume and compare runs from a container.
#   docker build -t kithara-ops .
#   docker run --rm -e MLFLOW_TRACKING_URI=http://mlflow:5000 -v "$PWD/runs:/work/runs" \
#     kithara-ops train --checkpoint-dir runs/tiny --save-every 50
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    KERAS_BACKEND=jax

RUN useradd --create-home --uid 10001 kithara

WORKDIR /opt/kithara-ops
COPY pyproject.toml README.md ./
COPY kithara_ops ./kithara_ops
# The same install as the README's first command (which CI runs), with no cache kept.
RUN pip install --no-cache-dir .

USER 10001
WORKDIR /work
# Checkpoints and the default sqlite MLflow store live here: mount a volume to keep them.
VOLUME ["/work"]

ENTRYPOINT ["kithara-ops"]
CMD ["--help"]
