# Image for docker-compose.yaml: Airflow 3.3.2 with this project's pinned requirements and the
# `reindex` core package installed (editable, from the mounted include/ at run time too).
FROM apache/airflow:3.3.2-python3.11

USER root
COPY --chown=airflow:root requirements.txt constraints.txt pyproject.toml /opt/reindex/
COPY --chown=airflow:root include /opt/reindex/include
USER airflow
WORKDIR /opt/reindex
# CPU torch wheel from PyTorch's index (the default one pulls the multi-GB CUDA build);
# CeleryExecutor needs the celery provider and redis client.
# The torch wheel index: CPU by default; the GPU worker image (compose profile gpu) passes a CUDA index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --extra-index-url ${TORCH_INDEX_URL} \
        -r requirements.txt -c constraints.txt
# The native result parser; without a compiler in the image the simdjson path is used.
RUN python -m reindex.native --optional
WORKDIR /opt/airflow
