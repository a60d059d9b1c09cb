# syntax=docker/dockerfile:1
# Multi-stage build: a full Rust toolchain builds the binary; the runtime image is distroless
# (glibc, CA certificates, no shell) and runs as a non-root user. No key, certificate, token or
# config is baked in: mount them at run time (see deploy/ and docs/OPERATIONS.md).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Build dependencies first so that source changes do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
# The workspace member the server takes its message types from (client/build.rs compiles proto/).
COPY client ./client
# Every target the manifest names must exist for cargo to read it (the criterion bench, the
# load generator): the bench's source is small; the binaries get stand-ins for this step.
COPY benches ./benches
RUN mkdir -p src/bin/piiguard-bench && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/piiguard-bench/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked --bin piiguard || true
COPY src ./src
COPY deploy/vault ./deploy/vault
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin piiguard \
    && strip target/release/piiguard \
    && mkdir -p /out/var/lib/piiguard/audit

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/piiguard /usr/local/bin/piiguard
# The audit log folder (audit.dir): mount a persistent volume here (90-day retention).
COPY --from=build --chown=65532:65532 /out/var/lib/piiguard /var/lib/piiguard
VOLUME ["/var/lib/piiguard/audit"]
USER nonroot:nonroot
# 7443: mutual-TLS gRPC. 7080: plaintext health-only listener for probes.
EXPOSE 7443 7080
ENTRYPOINT ["/usr/local/bin/piiguard"]
CMD ["serve", "--config", "/etc/piiguard/piiguard.toml"]
