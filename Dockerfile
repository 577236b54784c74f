# One image for the gateway, the worker and the botline command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY shared ./shared
RUN pip install . && useradd --system --uid 10001 botline
USER botline
# 8080: the gateway; 8081: the worker's probes (and metrics).
EXPOSE 8080 8081
CMD ["botline", "gateway"]
