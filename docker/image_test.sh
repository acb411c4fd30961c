#!/usr/bin/env bash
# `make image-test`: the container images built and run for real with podman + runc (no Docker
# engine needed), from a clean machine:
#   1. deps      podman, runc, debootstrap (apt-get, when missing); /etc/containers/containers.conf
#                (runc, cgroupfs, ulimits, host network for builds) when absent
#   2. base      localhost/semroute-base:bookworm: a debootstrapped Debian bookworm with python3 +
#                venv, imported with `podman import` (no registry here); reused when present
#   3. kafka     localhost/semroute-kafka:4.1.1 from docker/kafka/Containerfile (Maven jars)
#   4. router    localhost/semroute-stream:local from docker/Dockerfile (model built in)
#   5. smoke     the compose stack (kafka, topics, llm stand-in, router) on a podman network: a
#                ticket produced to support.tickets comes out on support.tickets.routed with route
#                "billing" and the stand-in's answer; /readyz is 200; SIGTERM drains, exit code 0
#   6. tc        tests/test_kafka_broker.py and tests/test_service.py through testcontainers,
#                against podman's Docker-compatible socket and the local Kafka image
# Usage: docker/image_test.sh [STEP...]   (default: all of them, in that order; `clean` removes
# this script's containers and network). Containers and the podman service are always cleaned up.
# Environment: BASE_IMAGE, KAFKA_IMAGE, ROUTER_IMAGE (tags), REBUILD_BASE=1 (debootstrap again),
# TC_TESTS (the pytest arguments of step 6), PY (the venv's python, default .venv/bin/python),
# SMOKE_LOG_LEVEL (the smoke router's log level, default info; its log: /tmp/semroute-image-test-*.log).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

BASE_IMAGE=${BASE_IMAGE:-localhost/semroute-base:bookworm}
KAFKA_IMAGE=${KAFKA_IMAGE:-localhost/semroute-kafka:4.1.1}
ROUTER_IMAGE=${ROUTER_IMAGE:-localhost/semroute-stream:local}
PY=${PY:-$REPO/.venv/bin/python}
TC_TESTS=${TC_TESTS:-tests/test_kafka_broker.py tests/test_service.py}
NET=semroute-it                      # the smoke stack's network and container-name prefix
SOCK=/tmp/semroute-podman-$$.sock
SERVICE_PID=
T0=$SECONDS

log() { printf '[image-test %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
fail() {
    log "FAIL: $*"
    exit 1
}

# ---------------------------------------------------------------------------------------------
step_deps() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
    command -v mvn >/dev/null || missing+=(maven)
    if ((${#missing[@]})); then
        log "apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if [ ! -e /etc/containers/containers.conf ]; then
        # runc: crun refuses this machine's hybrid cgroups; cgroupfs: no systemd; ulimits at or
        # below the current ones (no CAP_SYS_RESOURCE); host network by default (builds reach
        # the package registries). Containers on a podman network (below) work too.
        log "writing /etc/containers/containers.conf"
        mkdir -p /etc/containers
        cat >/etc/containers/containers.conf <<'EOF'
[containers]
netns = "host"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
    fi
    podman --version >&2
}

# ---------------------------------------------------------------------------------------------
step_base() {
    if [ -z "${REBUILD_BASE:-}" ] && podman image exists "$BASE_IMAGE"; then
        log "base: reusing $BASE_IMAGE"
        return
    fi
    local rootfs
    rootfs=$(mktemp -d /var/tmp/semroute-rootfs.XXXXXX)
    # The Debian mirror this machine's apt already uses (its first URIs / deb line).
    local mirror
    mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2; exit}')
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
    [ -n "$mirror" ] || fail "no Debian mirror found in /etc/apt (debootstrap needs one)"
    log "base: debootstrap bookworm (python3, venv, ca-certificates) from $mirror into $rootfs"
    if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
        tail -20 "$rootfs.log" >&2
        rm -rf "$rootfs"
        fail "debootstrap failed (log $rootfs.log)"
    fi
    # This machine's extra CA certificates (an egress proxy) and pip settings, so that pip and
    # apt inside the builds reach the registries the way the host does.
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null
    fi
    [ -e /etc/pip.conf ] && cp /etc/pip.conf "$rootfs/etc/pip.conf"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | podman import -q - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
    log "base: imported $BASE_IMAGE"
}

# ---------------------------------------------------------------------------------------------
step_kafka() {
    log "kafka: the broker jars (tests/kafka/lib, Maven Central)"
    "$PY" tests/kafka_local.py jars
    log "kafka: building $KAFKA_IMAGE"
    podman build -q --build-arg "BASE_IMAGE=$BASE_IMAGE" -f docker/kafka/Containerfile \
        -t "$KAFKA_IMAGE" . >/dev/null
}

step_router() {
    log "router: building $ROUTER_IMAGE"
    podman build -q --build-arg "BASE_IMAGE=$BASE_IMAGE" -f docker/Dockerfile \
        -t "$ROUTER_IMAGE" . >/dev/null
    # non-root, and the model is there (offline start needs it): fail here, not in the stack
    local who
    who=$(podman run --rm --entrypoint id "$ROUTER_IMAGE" -u)
    [ "$who" != 0 ] || fail "the router image runs as root"
    # Offline (no network), read-only root: the built-in model routes, the trained route head is
    # cached in the writable heads volume, and the model directory cannot be written.
    podman volume rm -f semroute-it-heads-check >/dev/null 2>&1 || true
    podman run --rm --network none --read-only --tmpfs /tmp \
        -v semroute-it-heads-check:/opt/semroute/cache/heads --entrypoint sh "$ROUTER_IMAGE" -c '
        set -e
        echo "{\"id\": \"1\", \"text\": \"I was charged twice for my subscription\"}" >/tmp/in.jsonl
        semroute-stream route --routes /app/config/routes.example.yaml --method head \
            --input /tmp/in.jsonl --output /tmp/out.jsonl >/dev/null
        grep -q "\"route\":\"billing\"" /tmp/out.jsonl || { cat /tmp/out.jsonl; exit 11; }
        ls /opt/semroute/cache/heads/*.npz >/dev/null || exit 12
        if touch /opt/semroute/cache/x 2>/dev/null; then exit 13; fi
        echo "router image: offline route ok, head cached in $(ls /opt/semroute/cache/heads)"
    ' >&2 || fail "the router image's offline/cache check failed (exit $?)"
    podman volume rm -f semroute-it-heads-check >/dev/null
}

# ---------------------------------------------------------------------------------------------
# The smoke test: docker/compose.yaml's services with podman. podman-compose is not used: the
# compose file's `depends_on: service_healthy` needs podman's healthchecks, which run from
# systemd timers (no systemd here, so a service would never become healthy); this function runs
# the same containers in the same order, with the same names on a podman network, and waits on
# the same checks itself. The names resolve through /etc/hosts entries (static addresses), not
# podman's DNS server: aardvark-dns reloads whenever a container joins the network and lookups
# made meanwhile fail ("Name or service not known"), which stalled the router's first LLM call.
clean_stack() {
    local c
    for c in router llm kafka client; do
        podman rm -f -v -t 0 "$NET-$c" >/dev/null 2>&1 || true
    done
    podman network rm -f "$NET" >/dev/null 2>&1 || true
    podman volume rm -f "$NET-heads" >/dev/null 2>&1 || true
}

SUBNET=${SMOKE_SUBNET:-10.89.213}   # the stack's network: $SUBNET.0/24
HOSTS=(--add-host "kafka:$SUBNET.10" --add-host "llm:$SUBNET.11" --add-host "router:$SUBNET.12")

client() { # docker/stack_client.py in a throwaway container on the stack's network
    podman run --rm --name "$NET-client" --network "$NET" --ip "$SUBNET.20" "${HOSTS[@]}" \
        -v "$REPO/docker/stack_client.py:/tmp/stack_client.py:ro" \
        --entrypoint python "$ROUTER_IMAGE" /tmp/stack_client.py "$@"
}

step_smoke() {
    clean_stack
    podman network create --disable-dns --subnet "$SUBNET.0/24" "$NET" >/dev/null
    log "smoke: kafka"
    podman run -d --name "$NET-kafka" --network "$NET" --ip "$SUBNET.10" "${HOSTS[@]}" \
        -e KAFKA_ADVERTISED_LISTENERS=PLAINTEXT://kafka:9092 -e KAFKA_NUM_PARTITIONS=3 \
        "$KAFKA_IMAGE" >/dev/null
    client topics kafka:9092 support.tickets support.tickets.routed support.tickets.dlq ||
        { podman logs --tail 30 "$NET-kafka" >&2; fail "kafka did not come up"; }
    log "smoke: llm stand-in (semroute-stream stub-llm)"
    podman run -d --name "$NET-llm" --network "$NET" --ip "$SUBNET.11" "${HOSTS[@]}" "$ROUTER_IMAGE" \
        stub-llm --host 0.0.0.0 --port 8000 --latency-ms 200 --verbose >/dev/null
    client readyz http://llm:8000/healthz 60 || fail "the llm stand-in did not answer"
    log "smoke: router (read-only root filesystem, the route heads on a volume)"
    podman run -d --name "$NET-router" --network "$NET" --ip "$SUBNET.12" "${HOSTS[@]}" \
        --read-only --tmpfs /tmp -v "$NET-heads:/opt/semroute/cache/heads" \
        -e HF_HUB_OFFLINE=1 -e "SEMROUTE_LOGGING__LEVEL=${SMOKE_LOG_LEVEL:-info}" \
        "$ROUTER_IMAGE" >/dev/null
    client readyz http://router:9464/readyz 180 ||
        { podman logs --tail 40 "$NET-router" >&2; fail "/readyz never answered 200"; }
    log "smoke: /readyz 200; producing a ticket, waiting for its routed outcome"
    client roundtrip kafka:9092 support.tickets support.tickets.routed ||
        { podman logs --tail 40 "$NET-router" >&2; fail "no routed outcome"; }
    log "smoke: SIGTERM to the router"
    podman kill --signal TERM "$NET-router" >/dev/null
    local code
    code=$(timeout 90 podman wait "$NET-router") || fail "the router did not exit within 90 s"
    local logs
    logs=$(podman logs "$NET-router" 2>&1)
    printf '%s\n' "$logs" >/tmp/semroute-image-test-router.log
    podman logs "$NET-llm" >/tmp/semroute-image-test-llm.log 2>&1 || true
    tail -3 <<<"$logs" >&2
    [ "$code" = 0 ] || fail "the router exited with $code after SIGTERM (expected 0)"
    grep -q '"stopped_by":"signal SIGTERM"' <<<"$logs" || fail "no drain summary after SIGTERM"
    log "smoke: the router drained and exited 0"
    clean_stack
}

# ---------------------------------------------------------------------------------------------
start_service() {
    rm -f "$SOCK"
    podman system service --time=0 "unix://$SOCK" >/tmp/semroute-podman-service.log 2>&1 &
    SERVICE_PID=$!
    local i
    for i in $(seq 100); do
        [ -S "$SOCK" ] && curl -sf --unix-socket "$SOCK" http://d/_ping >/dev/null && return
        sleep 0.1
    done
    fail "podman system service did not answer on $SOCK"
}

stop_service() {
    if [ -n "$SERVICE_PID" ]; then
        kill "$SERVICE_PID" 2>/dev/null || true
        wait "$SERVICE_PID" 2>/dev/null || true
        SERVICE_PID=
    fi
    rm -f "$SOCK"
}

step_tc() {
    start_service
    log "tc: testcontainers over $SOCK with $KAFKA_IMAGE: pytest $TC_TESTS"
    # conftest.py: no KAFKA_BOOTSTRAP_SERVERS, a Docker engine answers -> testcontainers
    # shellcheck disable=SC2086
    env -u KAFKA_BOOTSTRAP_SERVERS DOCKER_HOST="unix://$SOCK" TESTCONTAINERS_RYUK_DISABLED=true \
        KAFKA_TEST_IMAGE="$KAFKA_IMAGE" SEMROUTE_REQUIRE_TESTCONTAINERS=1 \
        "$PY" -m pytest -q -p no:cacheprovider $TC_TESTS
    stop_service
}

cleanup() {
    local rc=$?
    clean_stack
    # testcontainers' Kafka containers carry this label (tests/conftest.py)
    podman ps -aq --filter label=semroute-stream.tests=kafka | xargs -r podman rm -f -v -t 0 >/dev/null 2>&1 || true
    stop_service
    if ((rc == 0)); then
        log "image-test passed in $((SECONDS - T0)) s"
    else
        log "image-test FAILED (exit $rc) after $((SECONDS - T0)) s"
    fi
}

steps=("$@")
((${#steps[@]})) || steps=(deps base kafka router smoke tc)
trap cleanup EXIT
for s in "${steps[@]}"; do
    case $s in
    deps | base | kafka | router | smoke | tc) "step_$s" ;;
    clean) ;;
    *) fail "unknown step $s (deps base kafka router smoke tc clean)" ;;
    esac
done
