# domainrag appliance image (CPU). Build: docker build -t domainrag .
# CUDA variant: docker build -f Dockerfile.cuda -t domainrag:cuda .
# Models are not baked in: run scripts/fetch-models.sh on the host and mount data/models
# (docker-compose.yml does), so the image stays small and the models stay verifiable.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY web ./web
RUN cargo build --release --locked --bin domainrag

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /src/target/release/domainrag /usr/local/bin/domainrag
COPY config ./config
ENV DOMAINRAG__SERVER__BIND=0.0.0.0:8080 \
    DOMAINRAG__PATHS__DATA_DIR=/app/data \
    DOMAINRAG__PATHS__MODELS_DIR=/app/data/models
VOLUME ["/app/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["domainrag"]
CMD ["serve"]
