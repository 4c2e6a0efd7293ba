# The ledger as a container image: a Rust toolchain image builds it, a slim Debian runs it.
#   docker build -t ledger:local .
#   docker run --env-file .ledger/secrets.env -e DATABASE_URL=... -e NATS_URL=... ledger:local serve
# compose.yaml wires it to Postgres and NATS.

# The toolchain the project is developed with (Cargo.toml's rust-version is the floor).
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Compile-time checked queries (sqlx::query!) use the committed .sqlx/ data: no database at build time.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never
# The whole workspace in one go (see .dockerignore): simple and always right for any set of crates.
COPY . .
RUN cargo build --release --locked --bin ledger \
 && install -D -m 0755 target/release/ledger /out/ledger

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin ledger
WORKDIR /app
COPY --from=build /out/ledger /usr/local/bin/ledger
# `ledger migrate` applies migrations/ (kept beside the binary in case it reads them at run time).
COPY --from=build /src/migrations ./migrations
USER ledger
# Inside a container the API must listen on all interfaces; publish the port on 127.0.0.1 only.
ENV LEDGER_LISTEN=0.0.0.0:8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/health/live >/dev/null || exit 1
ENTRYPOINT ["ledger"]
CMD ["serve"]
