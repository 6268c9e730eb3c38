# syntax=docker/dockerfile:1
# Trellis's images, built from this repository's root:
#
#   docker build --target trellis      -t trellis:0.1.0 .
#   docker build --target trellis-init -t trellis-init:0.1.0 .
#
# `trellis` is the one binary of every tier (leader, edge, injector) on a
# distroless base (glibc, no shell, UID 65532); `trellis-init` is the
# sidecar's init container: /bin/sh and iptables, to which the injector
# hands deploy/sidecar/iptables.sh. No container engine runs on the
# project's machines: these images are not built or tested there.

ARG RUST_VERSION=1.88

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p trellis-leader --bin trellis \
 && cp target/release/trellis /usr/local/bin/trellis

FROM alpine:3.20 AS trellis-init
RUN apk add --no-cache iptables
USER 0:0

FROM gcr.io/distroless/cc-debian12:nonroot AS trellis
COPY --from=build /usr/local/bin/trellis /usr/local/bin/trellis
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/trellis"]
