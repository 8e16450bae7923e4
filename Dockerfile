# lbapp: the load balancer image; the echo backends of docker-compose.yml run from it too.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Dependencies come from the project's own metadata (pyproject.toml); README.md is its `readme`.
COPY pyproject.toml README.md ./
COPY lbapp ./lbapp
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin lbapp

USER lbapp
EXPOSE 8080

# Readiness as Envoy's /ready means it: lbapp has started (lifespan done, shared client open) and
# serves. It does not depend on the backends' health: with every backend down lbapp still works
# as designed (503 "all backends are down", /metrics served), and a container marked unhealthy
# then would only be restarted for nothing. The slim image has no curl: Python checks.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/lb-ready', timeout=2)"]

# lbapp's launcher is PID 1 (exec form) and gets SIGTERM itself; LB_GRACEFUL_TIMEOUT (30 s) gives
# in-flight requests time to finish (docker-compose.yml's stop_grace_period is longer, so no SIGKILL
# first). The launcher sets uvicorn's production flags and lbapp's hardened protocol; the flags
# win over LB_HOST/LB_PORT (the image must listen beyond its loopback on the port it EXPOSEs).
STOPSIGNAL SIGTERM
CMD ["lbapp", "--host", "0.0.0.0", "--port", "8080"]
