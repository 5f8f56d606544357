# cqrs-analytics: one binary, one image. The service role is picked by the
# command (`command-service`, `consumer-service`, `query-service`, `all`,
# `migrate`, `healthcheck <port>`); see docker-compose.yml.

# ---------------------------------------------------------------------------
# Builder: compile the dependencies once (cached until Cargo.toml or
# Cargo.lock change), then the crate itself.
# ---------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

WORKDIR /app

COPY Cargo.toml Cargo.lock ./
# The patched tiny_http ([patch.crates-io] in Cargo.toml) is a dependency: it
# belongs to the dependency layer.
COPY vendor ./vendor

# Dependency layer. Cargo refuses to read a manifest whose declared targets
# are missing, so every `path = "....rs"` in Cargo.toml (lib, the bin, the
# `it` test at tests/it/main.rs, the `pipeline` bench at benches/pipeline.rs,
# and any added later) gets a stub before the build; src/main.rs and
# src/lib.rs are stubbed even when they are implicit.
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && : > src/lib.rs \
    && sed -n 's/^[[:space:]]*path[[:space:]]*=[[:space:]]*"\([^"]*\.rs\)".*/\1/p' Cargo.toml \
       | while IFS= read -r target; do \
           mkdir -p "$(dirname "$target")"; \
           [ -e "$target" ] || echo 'fn main() {}' > "$target"; \
         done \
    && cargo build --release --locked \
    && rm -rf src

# The real sources, and the files they embed with include_str! (sql/,
# openapi.json served at /openapi.json, and the dashboard's page, script and
# style in src/read/dashboard/, which COPY src brings): all must be here at build time.
COPY src ./src
COPY sql ./sql
COPY openapi.json ./

# COPY keeps the files' original mtimes, which may be older than the stub
# build above: touch them and drop the stub's fingerprints so cargo rebuilds
# the crate instead of shipping the stub binary.
RUN find src sql openapi.json -type f -exec touch {} + \
    && rm -rf target/release/.fingerprint/cqrs-analytics-* \
              target/release/deps/cqrs_analytics-* \
              target/release/deps/libcqrs_analytics-* \
    && cargo build --release --locked --bin cqrs-analytics

# ---------------------------------------------------------------------------
# Runtime: Debian of the same release as the builder (same glibc), nothing
# installed (pure-Rust binary: no OpenSSL, no TLS, no CA bundle needed),
# non-root user with a fixed uid/gid.
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

LABEL org.opencontainers.image.title="cqrs-analytics" \
      org.opencontainers.image.description="CQRS e-commerce analytics: command, consumer and query services in one binary" \
      org.opencontainers.image.licenses="MIT"

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
               --no-log-init --home-dir /nonexistent --shell /usr/sbin/nologin app

# Owned by root, mode 0755 as cargo wrote it: the app user cannot change it.
COPY --from=builder /app/target/release/cqrs-analytics /usr/local/bin/cqrs-analytics

ENV HTTP_BIND_ADDR=0.0.0.0 \
    RUST_LOG=info

USER 10001:10001

# command-service, query-service, consumer-service (health + metrics only)
EXPOSE 8080 8081 8082

# No HEALTHCHECK here: the port depends on the role, so docker-compose.yml sets
# one per service, e.g. ["CMD", "/usr/local/bin/cqrs-analytics", "healthcheck", "8080"]
# (exits 0 when http://127.0.0.1:<port>/health answers 200; the image has no curl).

STOPSIGNAL SIGTERM

ENTRYPOINT ["/usr/local/bin/cqrs-analytics"]
CMD ["all"]
