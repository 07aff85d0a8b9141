FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streamrec streamrec
COPY storage storage
COPY streaming streaming
COPY trainer trainer
COPY service service
COPY deploy deploy
RUN pip install --no-cache-dir . \
    && cd / && python -c "import storage.tiered, service.embeddings"  # compiles the numba kernels into the image
ENV STREAMREC_METRICS_PORT=9100
CMD ["streamrec", "run", "--host", "0.0.0.0"]
