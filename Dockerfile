# syntax=docker/dockerfile:1
ARG PYTHON=python:3.11-slim-bookworm

# Build stage: durable-rules has no wheels and compiles C, so the compiler lives only here.
FROM ${PYTHON} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY rules ./rules
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[postgres]'

# Runtime stage: slim, no compiler, unprivileged.
FROM ${PYTHON}
# Production mode: refuses to start without JWT verification (see the README, "Trust").
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 IMNM_CDS_PRODUCTION=true
# glibc gives each thread that allocates its own arena (up to 8 a core); with request and evaluation
# threads they fragment, and a worker's memory crept up 9 MiB over a 100,000-request soak. Two keep it flat.
ENV MALLOC_ARENA_MAX=2
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin cds \
 && install -d -o cds -g cds /var/lib/imnm-cds
# Feedback and issued cards: a SQLite file on a volume, unless a PostgreSQL URL is given.
ENV IMNM_CDS_DATABASE_URL=sqlite:////var/lib/imnm-cds/feedback.sqlite
VOLUME /var/lib/imnm-cds
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]
CMD ["imnm-cds", "serve", "--host", "0.0.0.0", "--port", "8080", "--workers", "2", "--threads", "8"]
