# syntax=docker/dockerfile:1
# Two images from one build context:
#   docker build --target operator -t llavarun-operator .   (slim: the kopf operator, no torch)
#   docker build --target trainer  -t llava-trainer .       (CUDA PyTorch + DeepSpeed: every stage)
# Python dependencies are pinned in docker/requirements-*.txt, exported from uv.lock (make lock).

ARG PYTHON_BASE=python:3.11.11-slim-bookworm
# The tag's torch version is the one in uv.lock (tests/unit/test_lock.py checks it), and its CUDA
# that of the locked torch wheel. The devel flavour carries nvcc, which DeepSpeed needs to compile
# its fused ops just in time on the GPU node.
ARG TRAINER_BASE=pytorch/pytorch:2.15.0-cuda13.2-cudnn9-devel

FROM ${PYTHON_BASE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
RUN pip install --no-cache-dir build==1.2.2.post1 \
    && python -m build --wheel --outdir /dist .

FROM ${PYTHON_BASE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY docker/requirements-operator.txt /tmp/requirements.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps /tmp/dist/llavarun-*.whl \
    && rm -rf /tmp/dist /tmp/requirements.txt
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["llavarun"]
CMD ["operator"]

FROM ${TRAINER_BASE} AS trainer
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    DS_BUILD_OPS=0 HOME=/tmp
COPY docker/requirements-trainer.txt /tmp/requirements.txt
COPY --from=wheel /dist/ /tmp/dist/
# DeepSpeed's setup.py imports torch: build it against the base image's torch, ops compiled lazily.
RUN pip install --no-cache-dir --no-build-isolation -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps /tmp/dist/llavarun-*.whl \
    && rm -rf /tmp/dist /tmp/requirements.txt
# The pod securityContext runs as 1000:1000 (restricted profile); the image agrees.
RUN groupadd --gid 1000 llava && useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin llava
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["llava-trainer"]
