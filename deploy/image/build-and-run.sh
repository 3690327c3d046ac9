#!/usr/bin/env bash
# Builds the container image from the repository's Dockerfile with buildah
# and runs the gateway from inside it: what CI does to prove the image.
#
# No container registry is reachable here, so the two base images are made
# from Debian's packages: mmdebstrap writes a bookworm root filesystem
# (minbase and CA certificates for the runtime; plus gcc for the builder,
# with this machine's Rust toolchain and CA bundle copied in: Debian's own
# rustc is too old), which buildah imports. The Dockerfile is built unchanged, its bases
# named by --build-arg. Then, from the built image (buildah run, chroot
# isolation: the host's network, no namespaces):
#   - the binary's libraries resolve against the image's own libc;
#   - `balancer serve` starts with a config that sends to a mock upstream
#     on the host, `balancer healthcheck` answers, a chat request through
#     it is answered 200 by the mock, and `balancer stop` drains it.
#
# Needs root, buildah, mmdebstrap and a built mock-upstreams binary
# (MOCK_UPSTREAMS, default target/debug/mock-upstreams). REUSE_IMAGE=1
# runs an image built before instead of building again. Everything it
# starts listens on 127.0.0.1 and is stopped by PID before it exits.
#
# Disk: buildah's vfs driver copies every layer whole, so a build takes
# about 6 GB under /var/lib/containers and /var/tmp while it runs. The
# images it made and buildah's cargo cache are removed when it exits
# unless KEEP_IMAGE=1 (which REUSE_IMAGE=1 needs from the run before).
set -euo pipefail
cd "$(dirname "$0")/../.."

work="$(mktemp -d)"
buildah=(buildah --storage-driver vfs)
mock_pid=""
serve_pid=""
containers=()
images=(localhost/balancer:ci localhost/balancer-ci-builder:1.95 localhost/balancer-ci-runtime:bookworm)
# The cache of the Dockerfile's `RUN --mount=type=cache` (crates and
# target/): removed on exit only if this run made it.
build_cache=/var/tmp/buildah-cache
[ -e "$build_cache" ] && cache_was_here=yes || cache_was_here=""
cleanup() {
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true
  [ -n "$mock_pid" ] && kill "$mock_pid" 2>/dev/null || true
  for c in "${containers[@]}"; do "${buildah[@]}" rm "$c" >/dev/null 2>&1 || true; done
  if [ -z "${KEEP_IMAGE:-}" ]; then
    "${buildah[@]}" rmi --force "${images[@]}" >/dev/null 2>&1 || true
    "${buildah[@]}" rmi --prune >/dev/null 2>&1 || true
    [ -n "$cache_was_here" ] || rm -rf "$build_cache"
  fi
  rm -rf "$work"
}
trap cleanup EXIT

mirror=http://deb.debian.org/debian
echo "-- disk before the build: $(df -h --output=avail /var/lib 2>/dev/null | tail -1 | tr -d ' ') free under /var/lib"
if [ -n "${REUSE_IMAGE:-}" ] && "${buildah[@]}" inspect localhost/balancer:ci >/dev/null 2>&1; then
  echo "-- REUSE_IMAGE: running the image built before"
else
echo "-- runtime base: Debian bookworm minbase + CA certificates (mmdebstrap)"
mmdebstrap --quiet --mode=root --variant=minbase --include=ca-certificates \
  bookworm "$work/runtime.tar" "$mirror"
ctr="$("${buildah[@]}" from scratch)"; containers+=("$ctr")
"${buildah[@]}" add "$ctr" "$work/runtime.tar" / >/dev/null
"${buildah[@]}" commit --quiet "$ctr" localhost/balancer-ci-runtime:bookworm >/dev/null

echo "-- builder base: the same + gcc, and this machine's Rust $(rustc --version | cut -d' ' -f2)"
mmdebstrap --quiet --mode=root --variant=minbase --include=ca-certificates,gcc,libc6-dev \
  bookworm "$work/builder.tar" "$mirror"
sysroot="$(rustc --print sysroot)"
ctr="$("${buildah[@]}" from scratch)"; containers+=("$ctr")
"${buildah[@]}" add "$ctr" "$work/builder.tar" / >/dev/null
# This machine's CA certificates: crates.io is reached through its network
# (which may present its own certificate authority), as cargo here does.
"${buildah[@]}" copy "$ctr" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt >/dev/null
# rustc and cargo with the standard library for this target: no docs.
"${buildah[@]}" copy "$ctr" "$sysroot/bin/rustc" "$sysroot/bin/cargo" /usr/local/rust/bin/ >/dev/null
"${buildah[@]}" copy "$ctr" "$sysroot/lib" /usr/local/rust/lib >/dev/null
"${buildah[@]}" config \
  --env PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env CARGO_HOME=/usr/local/cargo "$ctr"
"${buildah[@]}" commit --quiet "$ctr" localhost/balancer-ci-builder:1.95 >/dev/null

echo "-- the image, from the Dockerfile"
"${buildah[@]}" build --quiet --isolation chroot --layers=false \
  --build-arg BUILDER_IMAGE=localhost/balancer-ci-builder:1.95 \
  --build-arg RUNTIME_IMAGE=localhost/balancer-ci-runtime:bookworm \
  -t localhost/balancer:ci -f Dockerfile . >/dev/null
fi
"${buildah[@]}" images localhost/balancer:ci

ctr="$("${buildah[@]}" from localhost/balancer:ci)"; containers+=("$ctr")
in_image() { "${buildah[@]}" run --isolation chroot "$@"; }

echo "-- the binary's libraries, resolved in the image"
in_image "$ctr" -- /lib64/ld-linux-x86-64.so.2 --list /usr/local/bin/balancer
in_image "$ctr" -- /usr/local/bin/balancer --version

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mock_port="$(free_port)"
gateway_port="$(free_port)"

echo "-- a mock upstream on the host, 127.0.0.1:$mock_port"
"${MOCK_UPSTREAMS:-target/debug/mock-upstreams}" --nodes 1 --base-port "$mock_port" \
  --key-prefix sk-image-ci- &
mock_pid=$!

mkdir -p "$work/config"
cat > "$work/config/Balancer.toml" <<EOF
[server]
listen = "127.0.0.1:$gateway_port"
pid_file = "/var/lib/balancer/balancer.pid"
watch_config = false
[health]
enabled = false
[[nodes]]
name = "host-mock"
url = "http://127.0.0.1:$mock_port/v1"
api_key_env = "NODE_KEY"
models = ["gpt-4o-mini"]
rpm = 1000
EOF

echo "-- balancer serve, inside the image"
# The image's own BALANCER_SERVER__LISTEN (0.0.0.0:8080) is overridden
# like any setting, by the environment.
in_image --env NODE_KEY=sk-image-ci-a --env "BALANCER_SERVER__LISTEN=127.0.0.1:$gateway_port" -v "$work/config:/etc/balancer-ci:ro" "$ctr" -- \
  /usr/local/bin/balancer serve --config /etc/balancer-ci/Balancer.toml &
serve_pid=$!

healthy=""
for _ in $(seq 1 100); do
  if in_image "$ctr" -- /usr/local/bin/balancer healthcheck \
      --url "http://127.0.0.1:$gateway_port/healthz" 2>/dev/null; then
    healthy=yes
    break
  fi
  kill -0 "$serve_pid" 2>/dev/null || { echo "the gateway in the image exited"; exit 1; }
  sleep 0.2
done
[ -n "$healthy" ] || { echo "balancer healthcheck never answered"; exit 1; }
echo "balancer healthcheck (run in the image): ok"

echo "-- a chat request through the gateway in the image to the host's mock"
status="$(curl -s -o "$work/answer.json" -w '%{http_code}' \
  "http://127.0.0.1:$gateway_port/v1/chat/completions" \
  -H 'content-type: application/json' \
  -d '{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"hello from the image test"}]}')"
echo "status $status: $(head -c 200 "$work/answer.json")"
[ "$status" = 200 ] || exit 1
grep -q '"chat.completion"' "$work/answer.json"

echo "-- balancer stop (SIGTERM through the pid file), the gateway drains and exits"
in_image -v "$work/config:/etc/balancer-ci:ro" "$ctr" -- \
  /usr/local/bin/balancer stop --config /etc/balancer-ci/Balancer.toml
wait "$serve_pid"
serve_pid=""
echo "the image builds and runs: ok"
