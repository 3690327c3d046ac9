#!/usr/bin/env bash
# The whole test suite, on a fresh machine, in one command:
#
#   ./test.sh                 # install what is missing, then cargo test --workspace
#   ./test.sh --check         # only say what is missing (installs nothing, runs nothing)
#   ./test.sh -- <args>       # extra arguments for cargo test (a filter, --nocapture, ...)
#
# What the tests need besides Rust, and who needs it:
#   postgresql     PostgreSQL's server binaries (initdb, postgres): the store tests
#                  start a real server (tests/it/pg.rs). Or BALANCER_TEST_PG_BIN.
#   chromium       headless Chromium: the dashboard test. Or BALANCER_TEST_CHROMIUM.
#   redis-server   real Redis servers: the cluster tests. Or BALANCER_TEST_REDIS_SERVER.
#   python openai  the official Python SDK (tests/sdk/python/requirements.txt).
#                  Or BALANCER_TEST_PYTHON naming a python that imports it.
#   npm openai     the official npm SDK (tests/sdk/node, Node.js 20 or later).
#
# Installing is idempotent: what is present is left alone. Debian packages
# come from apt-get (through sudo when not root), the SDKs from PyPI and npm.
# When something cannot be installed (no apt-get, no network, no sudo), the
# script names what is missing and how to provide it, one line each, and
# exits 2 before any test runs.
set -euo pipefail
cd "$(dirname "$0")"

check_only=false
cargo_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --check) check_only=true ;;
    --) shift; cargo_args=("$@"); break ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) cargo_args+=("$1") ;;
  esac
  shift
done

say() { echo "test.sh: $*"; }
problems=()
problem() { problems+=("test.sh: missing $1"); }

# --- What is here -----------------------------------------------------------

have_pg() {
  [ -n "${BALANCER_TEST_PG_BIN:-}" ] && [ -x "$BALANCER_TEST_PG_BIN/initdb" ] && return 0
  command -v initdb >/dev/null 2>&1 && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}
have_chromium() {
  [ -n "${BALANCER_TEST_CHROMIUM:-}" ] && [ -x "$BALANCER_TEST_CHROMIUM" ] && return 0
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || command -v google-chrome >/dev/null 2>&1
}
have_redis() {
  command -v "${BALANCER_TEST_REDIS_SERVER:-redis-server}" >/dev/null 2>&1
}
python_bin() { echo "${BALANCER_TEST_PYTHON:-python3}"; }
pinned_openai() { sed -n 's/^openai==//p' tests/sdk/python/requirements.txt; }
have_python_sdk() {
  local want
  want="$(pinned_openai)"
  "$(python_bin)" -c "import openai, sys; sys.exit(openai.__version__ != '$want')" >/dev/null 2>&1
}
node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
have_node() { command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 && [ "$(node_major)" -ge 20 ]; }
have_node_sdk() {
  local want got
  want="$(node -p 'require("./tests/sdk/node/package.json").dependencies.openai' 2>/dev/null || true)"
  got="$(node -p 'require("./tests/sdk/node/node_modules/openai/package.json").version' 2>/dev/null || true)"
  [ -n "$want" ] && [ "$want" = "$got" ]
}

# --- Debian packages --------------------------------------------------------

apt_packages=()
have_pg || apt_packages+=(postgresql)
have_chromium || apt_packages+=(chromium)
have_redis || apt_packages+=(redis-server)
command -v "$(python_bin)" >/dev/null 2>&1 || apt_packages+=(python3 python3-pip python3-venv)
have_node || apt_packages+=(nodejs npm)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else return 127
  fi
}

if [ ${#apt_packages[@]} -gt 0 ] && ! $check_only; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get on this machine: cannot install ${apt_packages[*]}"
  elif [ "$(id -u)" -ne 0 ] && ! sudo -n true >/dev/null 2>&1; then
    say "not root and no password-less sudo: cannot install ${apt_packages[*]}"
  else
    say "apt-get install ${apt_packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! { as_root apt-get update -qq >/dev/null && \
           as_root apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null; }; then
      say "apt-get could not install ${apt_packages[*]} (no network to the Debian mirror?)"
    fi
  fi
fi

have_pg || problem "PostgreSQL's server binaries (initdb, postgres; the store tests): apt-get install postgresql, or set BALANCER_TEST_PG_BIN to the directory holding them"
have_chromium || problem "Chromium (the dashboard test): apt-get install chromium, or set BALANCER_TEST_CHROMIUM to the browser's path"
have_redis || problem "redis-server (the cluster tests): apt-get install redis-server, or set BALANCER_TEST_REDIS_SERVER to its path"

# --- The official SDKs ------------------------------------------------------

if command -v "$(python_bin)" >/dev/null 2>&1 && ! have_python_sdk && ! $check_only; then
  say "pip install -r tests/sdk/python/requirements.txt"
  pip_log="$(mktemp)"
  if ! "$(python_bin)" -m pip install -q --disable-pip-version-check \
        -r tests/sdk/python/requirements.txt >"$pip_log" 2>&1; then
    if grep -q externally-managed-environment "$pip_log"; then
      # A distribution's own python refuses pip (PEP 668): use a venv of ours.
      venv="$PWD/target/sdk-python"
      say "this python is managed by the system; using a venv in $venv"
      if "$(python_bin)" -m venv "$venv" >>"$pip_log" 2>&1 && \
         "$venv/bin/python" -m pip install -q --disable-pip-version-check \
           -r tests/sdk/python/requirements.txt >>"$pip_log" 2>&1; then
        export BALANCER_TEST_PYTHON="$venv/bin/python"
      fi
    fi
  fi
  rm -f "$pip_log"
fi
if ! command -v "$(python_bin)" >/dev/null 2>&1; then
  problem "python3 (the Python SDK tests): apt-get install python3 python3-pip, or set BALANCER_TEST_PYTHON"
elif ! have_python_sdk; then
  problem "the Python openai package $(pinned_openai) (the Python SDK tests): pip install -r tests/sdk/python/requirements.txt (needs PyPI), or set BALANCER_TEST_PYTHON to a python that has it"
fi

if have_node && ! have_node_sdk && ! $check_only; then
  say "npm ci --prefix tests/sdk/node"
  npm ci --prefix tests/sdk/node --no-audit --no-fund --loglevel=error >/dev/null 2>&1 || true
fi
if ! have_node; then
  problem "Node.js 20 or later with npm (the npm SDK tests; found: $(node --version 2>/dev/null || echo none)): install nodejs and npm"
elif ! have_node_sdk; then
  problem "the npm openai package (the npm SDK tests): npm ci --prefix tests/sdk/node (needs the npm registry)"
fi

# --- Then the tests ---------------------------------------------------------

if [ ${#problems[@]} -gt 0 ]; then
  printf '%s\n' "${problems[@]}" >&2
  if $check_only; then exit 1; fi
  say "not running the tests: ${#problems[@]} prerequisite(s) missing (above)" >&2
  exit 2
fi
if $check_only; then
  say "every prerequisite is here"
  exit 0
fi
say "every prerequisite is here; cargo test --workspace ${cargo_args[*]:-}"
exec cargo test --workspace "${cargo_args[@]}"
