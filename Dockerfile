# syntax=docker/dockerfile:1
#
# balancer's container image: a release build on Debian bookworm, run as a
# non-root user on distroless (glibc, CA certificates, nothing else: no
# shell, no package manager).
#
#   docker build -t balancer .
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/Balancer.toml:/etc/balancer/Balancer.toml:ro" \
#     -e APP_GATEWAY_KEY -e NODE_A_KEY -e NODE_B_KEY -e NODE_C_KEY \
#     -v balancer-data:/var/lib/balancer \
#     balancer
#
# The config is read from /etc/balancer/Balancer.toml (mount yours there);
# keys come from the environment variables it names. Clients and usage live
# in /var/lib/balancer (a volume) unless [store] url names PostgreSQL.
#
# Both base images can be replaced with build arguments (CI builds this
# file with buildah against bases it makes from Debian's packages, see
# deploy/image/build-and-run.sh): the builder needs a Rust 1.95 toolchain
# and a C compiler on PATH, the runtime glibc 2.36 or newer and CA
# certificates.
ARG BUILDER_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---- build -------------------------------------------------------------
# hadolint ignore=DL3006
FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
# The whole workspace (mock-upstreams and loadtest are its members); the
# binary is built without the `demo` feature, so no mock is in it.
# .dockerignore keeps target/ out.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p balancer --bin balancer --no-default-features \
    && install -D -m 0755 target/release/balancer /out/balancer \
    && install -d -o 65532 -g 65532 /out/data

# ---- run ---------------------------------------------------------------
# hadolint ignore=DL3006
FROM ${RUNTIME_IMAGE}
COPY --from=build /out/balancer /usr/local/bin/balancer
COPY --from=build --chown=65532:65532 /out/data /var/lib/balancer
COPY Balancer.toml /etc/balancer/Balancer.toml

# Every setting can be overridden as BALANCER_<SECTION>__<FIELD>. In a
# container the gateway listens on every interface; the admin API stays on
# loopback unless BALANCER_ADMIN__LISTEN says otherwise.
ENV BALANCER_CONFIG=/etc/balancer/Balancer.toml \
    BALANCER_SERVER__LISTEN=0.0.0.0:8080 \
    BALANCER_SERVER__PID_FILE=/var/lib/balancer/balancer.pid \
    BALANCER_STORE__URL=sqlite:///var/lib/balancer/balancer.db \
    BALANCER_LOG__FORMAT=json

USER 65532:65532
VOLUME ["/var/lib/balancer"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/balancer", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/balancer"]
CMD ["serve"]
