# syntax=docker/dockerfile:1
#
# Conclave container image: one static-ish binary on debian:bookworm-slim.
#
#   docker build -t conclave .
#   docker run --rm -v conclave-data:/var/lib/conclave -v $PWD/conclave.toml:/etc/conclave/conclave.toml:ro \
#       -p 8080:8080/tcp -p 7882:7882/udp -p 7881:7881/tcp conclave
#
# The build needs no protoc and no system libraries: SQLite is bundled (rusqlite `bundled`),
# TLS is rustls, the LiveKit protobufs come pre-generated in the livekit-protocol crate.

# ---------------------------------------------------------------- builder
FROM rust:1-bookworm AS builder
WORKDIR /src

# Only what the build reads: the manifest, the lock file, the sources and the example config
# (src/config.rs embeds conclave.example.toml with include_str!). bench/ is a workspace member,
# so cargo needs it to load the workspace; only the conclave binary is built.
COPY Cargo.toml Cargo.lock conclave.example.toml ./
COPY src ./src
COPY bench ./bench

# Cache mounts keep the registry and compiled dependencies between builds; the binary is copied
# out of the cached target directory because cache mounts are not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin conclave \
    && install -m 0755 target/release/conclave /usr/local/bin/conclave

# ---------------------------------------------------------------- runtime
FROM debian:bookworm-slim

# ca-certificates: TLS to homeservers and federation (OpenID userinfo) uses the system roots.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# An unprivileged user owning the data directory. A new named volume mounted at
# /var/lib/conclave takes this ownership from the image.
RUN groupadd --system --gid 10001 conclave \
    && useradd --system --uid 10001 --gid conclave --home-dir /var/lib/conclave \
        --no-create-home --shell /usr/sbin/nologin conclave \
    && mkdir -p /var/lib/conclave /etc/conclave \
    && chown conclave:conclave /var/lib/conclave \
    && chmod 0700 /var/lib/conclave

COPY --from=builder /usr/local/bin/conclave /usr/local/bin/conclave

# data_dir for every command, also those run without --config (e.g. generate-registration).
ENV CONCLAVE_DATA_DIR=/var/lib/conclave \
    RUST_LOG=info

USER conclave
WORKDIR /var/lib/conclave
VOLUME ["/var/lib/conclave"]

# HTTP: appservice API, /sfu/get + /get_token, SFU WebSocket, /healthz, /metrics.
EXPOSE 8080/tcp
# Media: rtc.udp_port; ICE over TCP for clients without UDP: rtc.tcp_port.
EXPOSE 7882/udp
EXPOSE 7881/tcp
# The embedded TURN server, when turn.enabled: turn.udp_port, turn.tcp_port, turn.tls_port.
EXPOSE 3478/udp
EXPOSE 3478/tcp
EXPOSE 5349/tcp

ENTRYPOINT ["conclave"]
CMD ["serve", "--config", "/etc/conclave/conclave.toml"]
