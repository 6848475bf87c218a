# pgtenant container image. Build: docker build -t pgtenant .
# Run: mount a config at /etc/pgtenant/pgtenant.toml (see config/docker/pgtenant.toml):
#   docker run -v $PWD/config/docker/pgtenant.toml:/etc/pgtenant/pgtenant.toml:ro \
#              -p 6432:6432 -p 9127:9127 pgtenant
# The config must set [metrics] listen on port 9127 for the healthcheck, and [control] dsn
# to the control role `pgtenant init` creates (the login role of [databases.*] may not read
# the signing key or the token registry).

# ---- build: a wheel of pgtenant and of every dependency (compilers stay in this stage)
FROM python:3.11-slim AS build
# gcc: setup.py compiles the protocol core with mypyc (pure Python without it, issue 16).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY pgtenant ./pgtenant
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---- runtime: the wheels only, run as an unprivileged user
FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pgtenant \
    && mkdir -p /etc/pgtenant
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV PGTENANT_CONFIG=/etc/pgtenant/pgtenant.toml \
    PYTHONUNBUFFERED=1
USER pgtenant
EXPOSE 6432 9127
# SIGTERM drains: running transactions finish within shutdown_timeout.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9127/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["pgtenant"]
CMD ["serve", "--config", "/etc/pgtenant/pgtenant.toml"]
