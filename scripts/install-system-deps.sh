#!/usr/bin/env bash
# Installs what the local test services need (scripts/services.py) — idempotent, and a no-op
# taking well under 2 s when everything is present:
#   * redis-server and prometheus (+ promtool) from Debian packages, unless
#     DRIFTLINE_REDIS_URL / DRIFTLINE_PROMETHEUS_BIN (or a prometheus on PATH) are given;
#   * Apache Kafka 4.3.1 jars into .cache/kafka-4.3.1/libs via Maven (scripts/kafka/pom.xml),
#     unless DRIFTLINE_KAFKA_BOOTSTRAP is given. Needs Java 17+ and mvn.
# With DRIFTLINE_KAFKA_BOOTSTRAP, DRIFTLINE_REDIS_URL and a Prometheus (binary or
# DRIFTLINE_PROMETHEUS_URL) all given it does nothing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
KAFKA_VERSION=4.3.1
KAFKA_HOME=".cache/kafka-${KAFKA_VERSION}"
KAFKA_STAMP="${KAFKA_HOME}/.complete"

say() { echo "install-system-deps: $*"; }
die() {
    echo "install-system-deps: ERROR: $*" >&2
    exit 1
}
# An executable on PATH (bash's `command -v` also reports non-executable files).
find_exec() {
    local path
    path=$(command -v "$1" 2>/dev/null) && [[ -x "$path" ]] && echo "$path"
}

prometheus_bin="${DRIFTLINE_PROMETHEUS_BIN:-$(find_exec prometheus || true)}"
if [[ -n "${DRIFTLINE_PROMETHEUS_BIN:-}" && ! -x "${DRIFTLINE_PROMETHEUS_BIN}" ]]; then
    die "DRIFTLINE_PROMETHEUS_BIN=${DRIFTLINE_PROMETHEUS_BIN} is not an executable file"
fi
have_prometheus=0
[[ -n "$prometheus_bin" || -n "${DRIFTLINE_PROMETHEUS_URL:-}" ]] && have_prometheus=1

if [[ -n "${DRIFTLINE_KAFKA_BOOTSTRAP:-}" && -n "${DRIFTLINE_REDIS_URL:-}" && $have_prometheus == 1 ]]; then
    say "Kafka, Redis and Prometheus are all given; nothing to install"
    exit 0
fi

# ---------------------------------------------------------------- Debian packages
packages=()
if [[ -z "${DRIFTLINE_REDIS_URL:-}" ]] && ! find_exec redis-server >/dev/null; then
    packages+=(redis-server)
fi
if [[ $have_prometheus == 0 ]]; then
    packages+=(prometheus)
fi

if ((${#packages[@]})); then
    if [[ $(id -u) == 0 ]]; then
        as_root=()
    elif find_exec sudo >/dev/null; then
        as_root=(sudo)
    else
        die "need root or sudo to apt-get install ${packages[*]} (or set DRIFTLINE_REDIS_URL / DRIFTLINE_PROMETHEUS_BIN)"
    fi
    find_exec apt-get >/dev/null || die "apt-get not found; install ${packages[*]} by hand"
    # Keep the packages' init scripts from starting system-wide daemons (they would listen
    # on the default ports): the standard policy-rc.d that denies service starts.
    created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${as_root[@]}" chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    cleanup_policy() {
        if [[ $created_policy == 1 ]]; then "${as_root[@]}" rm -f /usr/sbin/policy-rc.d; fi
    }
    trap cleanup_policy EXIT
    apt_log=$(mktemp)
    apt() {
        say "apt-get $*"
        if ! "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q "$@" >"$apt_log" 2>&1; then
            tail -n 30 "$apt_log" >&2
            die "apt-get $* failed"
        fi
    }
    apt update
    apt install -y --no-install-recommends "${packages[@]}"
    rm -f "$apt_log"
    cleanup_policy
    created_policy=0
    trap - EXIT
    for pkg in "${packages[@]}"; do # package name == binary name for both
        find_exec "$pkg" >/dev/null || die "$pkg is still missing after apt-get install $pkg"
    done
else
    say "redis-server and prometheus: present or not needed"
fi

# ---------------------------------------------------------------- Kafka jars
if [[ -n "${DRIFTLINE_KAFKA_BOOTSTRAP:-}" ]]; then
    say "DRIFTLINE_KAFKA_BOOTSTRAP given; Kafka jars not needed"
    exit 0
fi

java_bin="${JAVA_HOME:+$JAVA_HOME/bin/}java"
find_exec "$java_bin" >/dev/null ||
    die "java not found: the local Kafka needs Java 17+ (apt-get install openjdk-17-jre-headless, or set JAVA_HOME)"
java_version=$("$java_bin" -version 2>&1 | sed -n 's/.*version "\([0-9]*\)[^"]*".*/\1/p' | head -n1)
if [[ -z "$java_version" || "$java_version" -lt 17 ]]; then
    die "Java ${java_version:-?} found at $(command -v "$java_bin"); the local Kafka ${KAFKA_VERSION} needs Java 17+"
fi

if [[ -f "$KAFKA_STAMP" && -f "${KAFKA_HOME}/libs/kafka_2.13-${KAFKA_VERSION}.jar" ]]; then
    say "Kafka ${KAFKA_VERSION} jars present in ${KAFKA_HOME}/libs (Java ${java_version})"
    exit 0
fi

find_exec mvn >/dev/null ||
    die "mvn not found: fetching the Kafka ${KAFKA_VERSION} jars needs Maven 3.6+ (apt-get install maven)"
say "fetching Kafka ${KAFKA_VERSION} jars with Maven into ${KAFKA_HOME}/libs"
started=$SECONDS
tmp_libs="${KAFKA_HOME}/libs.tmp.$$"
rm -rf "$tmp_libs"
mkdir -p "$KAFKA_HOME"
if ! mvn -B -q -f scripts/kafka/pom.xml dependency:copy-dependencies \
    -Dkafka.libs.dir="$PWD/$tmp_libs" >"${KAFKA_HOME}/mvn.log" 2>&1; then
    tail -n 40 "${KAFKA_HOME}/mvn.log" >&2
    rm -rf "$tmp_libs"
    die "Maven could not fetch the Kafka jars (full log: ${KAFKA_HOME}/mvn.log)"
fi
rm -rf "${KAFKA_HOME}/libs"
mv "$tmp_libs" "${KAFKA_HOME}/libs"
touch "$KAFKA_STAMP"
say "fetched $(find "${KAFKA_HOME}/libs" -name '*.jar' | wc -l) jars in $((SECONDS - started))s"
