# fedge edge agent image. Build from the repo root:
#   docker build -f docker/agent.Dockerfile -t fedge-agent .
# Run: docker run ... fedge-agent agent --config /config/agent.yaml
# Inference only: docker run ... fedge-agent agent predict --model M.onnx --input X.npz
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# torch first, from the CPU-only index: left to PyPI, pip resolves the multi-GB CUDA build.
# Pinned to the version pyproject.toml admits (torch<=2.13.0), so the next step keeps it.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Only what the wheel is built from: no tests, bench, docs or runs (see .dockerignore too).
# All packages go in (they are a few hundred KB): `fedge` builds its parser from every role.
# README.m[d] is optional: the wildcard copies it when it exists.
WORKDIR /src
COPY pyproject.toml README.m[d] ./
COPY fedge ./fedge
COPY fedge_cli ./fedge_cli
COPY aggregator ./aggregator
COPY edge_agent ./edge_agent
COPY models ./models
COPY simulation ./simulation
# `fedge models` imports the CLI and torch: a smoke test of the installed package.
# DL3013: the versions are the ranges in pyproject.toml (the project has no lock file).
# hadolint ignore=DL3013
RUN pip install '.[agent]' \
    && fedge models >/dev/null \
    && rm -rf /src

# Non-root. /var/lib/fedge (state) and /data (mounted read-only) belong to it, so volumes
# mounted there start out owned by it as well.
RUN groupadd --system --gid 10001 fedge \
    && useradd --system --uid 10001 --gid fedge --home-dir /var/lib/fedge --create-home fedge \
    && install -d -o fedge -g fedge /data
# Numeric, so runtimes that enforce non-root (runAsNonRoot) can verify it.
USER 10001:10001
WORKDIR /var/lib/fedge

# Healthy while the process holds an established TCP connection to the broker port
# (FEDGE_BROKER_PORT; 8883 for mqtts). There is no HTTP endpoint; this reads the container's
# own /proc/net/tcp{,6}, so it needs no extra tools and tells "connected" from "retrying".
ENV FEDGE_BROKER_PORT=1883
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["python", "-c", "import os,sys; p=':%04X' % int(os.environ.get('FEDGE_BROKER_PORT', '1883')); rows=[r.split() for f in ('/proc/net/tcp', '/proc/net/tcp6') if os.path.exists(f) for r in open(f).readlines()[1:]]; sys.exit(0 if any(r[2].endswith(p) and r[3] == '01' for r in rows) else 1)"]

ENTRYPOINT ["fedge"]
CMD ["agent", "--config", "/config/agent.yaml"]
