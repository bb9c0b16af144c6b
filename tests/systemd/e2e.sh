#!/usr/bin/env bash
# End-to-end test of the Debian packages under a real systemd: boots a Debian
# bookworm rootfs with systemd-nspawn (--ephemeral: the cached base stays
# pristine), installs relayd, agentd and tunnelctl with dpkg, and proves the
# service integration step by step (see tests/systemd/README.md). Every
# command of docs/INSTALL.md that can run here is run here, as written there
# (localhost for relay.example.com, no sudo: this is root).
#
#   sudo tests/systemd/e2e.sh
#
# Needs: root on Debian 12 (installs systemd-container and debootstrap with
# apt-get when missing), the packages in target/packages/*.deb, a
# stand-in-ollama binary (target/{release,debug}/stand-in-ollama), network to
# the Debian mirror apt uses on the first run only (the rootfs is cached).
#
# Environment:
#   E2E_ROOTFS   cached base rootfs (default target/e2e-rootfs; made by
#                debootstrap when absent, reused as is when present)
#   E2E_PKGDIR   where the .deb (and .rpm) files are (default target/packages)
#   E2E_STANDIN  the stand-in-ollama binary (default: the newer of
#                target/release/stand-in-ollama and target/debug/stand-in-ollama)
#   E2E_FROM     "packages" (default) or "build": a REHEARSAL that places the
#                binaries of E2E_BUILD_DIR (default target/debug) and the
#                repository's units/sysusers/tmpfiles/configs by hand where the
#                packages put them. Steps 1 and 12 then test nothing of the
#                packaging, step 11 (upgrade) is skipped; use it only while no
#                package exists.
#   E2E_MIRROR   the Debian mirror for debootstrap (default: the one apt uses)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
ROOTFS=$(realpath -m "${E2E_ROOTFS:-target/e2e-rootfs}")
PKGDIR=$(realpath -m "${E2E_PKGDIR:-target/packages}")
FROM=${E2E_FROM:-packages}
BUILD_DIR=$(realpath -m "${E2E_BUILD_DIR:-target/debug}")
SUITE=bookworm
CHAT_BODY='{"model":"m","messages":[{"role":"user","content":"hi"}]'
# libpam-systemd and dbus-user-session: a user manager (user@UID.service, for
# the user unit) gets XDG_RUNTIME_DIR from pam_systemd and its bus at
# /run/user/UID/bus, as on a desktop.
INCLUDE=systemd,systemd-sysv,dbus,procps,iproute2,curl,ca-certificates,openssl,libpam-systemd,dbus-user-session

T0=$(date +%s)
NSPAWN_PID=
LEADER=
NSPAWN_LOG=
SLOW_PID=
STEP_T0=$T0
OUT=

# ---------------------------------------------------------------- helpers

say() { printf '%s\n' "$*"; }

SECTIONS=0
section() {
    local now; now=$(date +%s)
    [ "$SECTIONS" -eq 0 ] || say "    (section took $((now - STEP_T0)) s)"
    SECTIONS=$((SECTIONS + 1))
    STEP_T0=$now
    say ""
    say "=================================================================="
    say "== $*"
    say "=================================================================="
}

diagnostics() {
    [ -n "$LEADER" ] && [ -d "/proc/$LEADER" ] || return 0
    say "---- diagnostics (container) ----"
    ct 'systemctl --no-pager status relayd.socket relayd agentd ollama 2>&1 | head -60
        journalctl --no-pager -n 60 -u relayd -u agentd -u ollama 2>&1
        for u in /run/user/[0-9]*; do
            [ -d "$u" ] || continue
            systemctl --no-pager status "user@${u##*/}.service" 2>&1 | head -20
            journalctl --no-pager -n 40 _UID="${u##*/}" 2>&1
        done
        if systemctl --no-pager list-units --all --no-legend "user@*" 2>/dev/null | grep -q .; then
            systemctl --no-pager status "user@*" 2>&1 | head -20
            journalctl --no-pager -n 40 -u "user@*" -u "user-runtime-dir@*" -u systemd-logind 2>&1
        fi' 2>&1 || true
}

DIAG_DONE=
fail() {
    say ""
    say "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    say "!! FAIL: $*"
    say "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    if [ -z "$DIAG_DONE" ]; then DIAG_DONE=1; diagnostics; fi
    exit 1
}

on_err() { fail "unexpected error at line $1 (exit $2): $3"; }
trap 'on_err "$LINENO" "$?" "$BASH_COMMAND"' ERR

ok() { say "ok: $*"; }

WARNINGS=()
warn() { say "WARNING: $*"; WARNINGS+=("$*"); }

# A command inside the container, as root in its home (/root: relative file
# names such as alice.credential are there), with a clean environment.
ct() {
    nsenter -t "$LEADER" -a -- /usr/bin/env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER= SYSTEMD_COLORS=0 \
        /bin/bash -o pipefail -c "cd /root || exit 1
$1"
}

# as_user USER CMD: CMD as USER (runuser: his groups as of now) in his home,
# with his user manager's environment (XDG_RUNTIME_DIR, the session bus
# address), as a login of his would have; prints the command for ct/run.
as_user() {
    local uid; uid=$(ct "id -u $1")
    printf 'runuser -u %s -- env XDG_RUNTIME_DIR=/run/user/%s DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/%s/bus bash -o pipefail -c %q' \
        "$1" "$uid" "$uid" "cd && $2"
}

# run_as [-e CODE] USER CMD: run, as USER (see as_user); prints "USER$ CMD".
run_as() {
    local want=0 rc=0
    if [ "$1" = "-e" ]; then want=$2; shift 2; fi
    say "$1\$ $2"
    OUT=$(ct "$(as_user "$1" "$2")" 2>&1) || rc=$?
    [ -z "$OUT" ] || say "$OUT"
    [ "$rc" -eq "$want" ] || fail "exit code $rc, expected $want: ($1) $2"
    [ "$want" -eq 0 ] || say "(exit $rc, as expected)"
}

# run [-e CODE] [-t N] CMD: prints "$ CMD" and its answer (stdout and
# stderr; with -t only its last N lines); fails unless it exits with CODE
# (default 0). The whole answer is left in $OUT.
run() {
    local want=0 rc=0 tail=
    while :; do
        case "$1" in
            -e) want=$2; shift 2 ;;
            -t) tail=$2; shift 2 ;;
            *) break ;;
        esac
    done
    say "\$ $1"
    OUT=$(ct "$1" 2>&1) || rc=$?
    if [ -n "$tail" ] && [ "$(wc -l <<<"$OUT")" -gt "$tail" ]; then
        say "[... $(($(wc -l <<<"$OUT") - tail)) earlier lines of the answer not shown ...]"
        tail -n "$tail" <<<"$OUT"
    elif [ -n "$OUT" ]; then
        say "$OUT"
    fi
    [ "$rc" -eq "$want" ] || fail "exit code $rc, expected $want: $1"
    [ "$want" -eq 0 ] || say "(exit $rc, as expected)"
}

# run on the host, same contract.
host() {
    local want=0 rc=0
    if [ "$1" = "-e" ]; then want=$2; shift 2; fi
    say "\$ $1   # on the host"
    OUT=$(bash -o pipefail -c "$1" 2>&1) || rc=$?
    [ -z "$OUT" ] || say "$OUT"
    [ "$rc" -eq "$want" ] || fail "exit code $rc, expected $want: $1"
}

# expect WHAT REGEX: $OUT must match the extended regex.
expect() {
    grep -Eq -- "$2" <<<"$OUT" || fail "$1: expected /$2/ in the answer above"
    ok "$1"
}
expect_not() {
    if grep -Eq -- "$2" <<<"$OUT"; then fail "$1: /$2/ must not be in the answer above"; fi
    ok "$1"
}

# wait_until WHAT LIMIT_S CMD: polls CMD (inside) until it exits 0, at most
# LIMIT_S seconds; prints the command and its last answer.
wait_until() {
    local what=$1 limit=$2 cmd=$3 start rc
    start=$(date +%s.%N)
    say "\$ $cmd   # polled until it succeeds, at most ${limit}s"
    while :; do
        rc=0; OUT=$(ct "$cmd" 2>&1) || rc=$?
        [ "$rc" -eq 0 ] && break
        if awk -v s="$start" -v l="$limit" -v n="$(date +%s.%N)" 'BEGIN{exit !(n - s > l)}'; then
            [ -z "$OUT" ] || say "$OUT"
            fail "$what: not within ${limit}s"
        fi
        sleep 0.2
    done
    [ -z "$OUT" ] || say "$OUT"
    ok "$what (after $(awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN{printf "%.1f", n - s}') s)"
}

# slow_start TOKENS DELAY_MS: a streamed chat request in the background
# (inside), paced by the stand-in; returns once its first line arrived.
slow_start() {
    local cmd="rm -f /root/slow.*; curl -sS -N --fail-with-body --cacert /root/pki/ca.pem https://localhost/api/tunnel/alice/api/chat -d '$CHAT_BODY,\"options\":{\"num_predict\":$1,\"token_delay_ms\":$2}}' > /root/slow.out 2> /root/slow.err; echo \$? > /root/slow.rc"
    say "\$ $cmd &   # $1 tokens, $2 ms apart: about $(($1 * $2 / 1000)) s"
    ct "$cmd" >/dev/null 2>&1 &
    SLOW_PID=$!
    wait_until "the slow stream started" 10 'n=$(grep -c "^{" /root/slow.out 2>/dev/null); echo "$n lines so far"; [ "${n:-0}" -ge 1 ]'
}

# slow_finish TOKENS WHAT: the stream was still running after WHAT, then
# ended complete: curl 0, TOKENS lines and the done line, no error line.
slow_finish() {
    local total=$(($1 + 1))
    run "echo \"\$(grep -c '^{' /root/slow.out) of $total lines when $2 was done\"; [ ! -e /root/slow.rc ]"
    ok "the stream was still running during $2"
    wait_until "the slow stream ended" 30 'cat /root/slow.rc 2>/dev/null'
    wait "$SLOW_PID" 2>/dev/null || true
    SLOW_PID=
    run 'cat /root/slow.rc; cat /root/slow.err; grep -c "^{" /root/slow.out; tail -n1 /root/slow.out'
    expect "curl exited 0" '^0$'
    expect "all $total lines arrived" "^$total\$"
    expect "the stream ended with done" '"done":true'
    run 'grep -c "\"error\"" /root/slow.out || true'
    expect "no error line in the stream" '^0$'
}

cleanup() {
    local rc=$?
    trap - ERR
    if [ -n "$SLOW_PID" ]; then kill "$SLOW_PID" 2>/dev/null || true; fi
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        say ""
        say "== cleanup: stopping the container"
        local STOP_T0; STOP_T0=$(date +%s)
        # Killing the container's PID 1 ends its PID namespace at once;
        # systemd-nspawn then removes the ephemeral copy and exits.
        if [ -n "$LEADER" ]; then kill -KILL "$LEADER" 2>/dev/null || true; fi
        for _ in $(seq 1 300); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$NSPAWN_PID" 2>/dev/null; then
            kill -TERM "$NSPAWN_PID" 2>/dev/null || true
            for _ in $(seq 1 100); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$NSPAWN_PID" 2>/dev/null || true
        fi
        wait "$NSPAWN_PID" 2>/dev/null || true
        say "container gone after $(($(date +%s) - STOP_T0)) s"
    fi
    # An ephemeral copy left behind (nspawn killed) is removed here.
    local d
    for d in "$(dirname "$ROOTFS")"/.#machine."$(basename "$ROOTFS")"*; do
        [ -e "$d" ] || continue
        case " ${EPHEMERAL_BEFORE:-} " in *" $d "*) continue ;; esac
        say "removing leftover ephemeral copy $d"
        rm -rf --one-file-system -- "$d"
    done
    if [ -n "$NSPAWN_LOG" ]; then rm -f "$NSPAWN_LOG"; fi
    say "total: $(($(date +%s) - T0)) s"
    local w
    for w in "${WARNINGS[@]}"; do say "WARNING (not gated): $w"; done
    if [ "$rc" -eq 0 ]; then say "E2E: ALL STEPS PASSED"; else say "E2E: FAILED (exit $rc)"; fi
}
trap cleanup EXIT

# ------------------------------------------------------------ preparation

section "0. host: tools, rootfs, container"
[ "$(id -u)" -eq 0 ] || fail "run as root"
host "df -h / $(dirname "$ROOTFS")"

# A cached rootfs made with an older --include list is made again.
if [ -d "$ROOTFS" ]; then
    for p in ${INCLUDE//,/ }; do
        if ! awk -v p="$p" '$0 == "Package: " p {f=1} f && /^Status:/ {ok = ($0 == "Status: install ok installed"); exit} END {exit !ok}' \
                "$ROOTFS/var/lib/dpkg/status" 2>/dev/null; then
            say "rootfs: $ROOTFS lacks package $p (made with an older --include list): making it again"
            rm -rf --one-file-system -- "$ROOTFS"
            break
        fi
    done
fi

missing=()
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
[ -d "$ROOTFS" ] || command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    host "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${missing[*]}"
fi

if [ "$FROM" = packages ]; then
    # DEB[p]: the newest file of package p (cargo-deb names NAME_VERSION_ARCH.deb),
    # by its name in /mnt/pkg, where the commands of docs/INSTALL.md run.
    declare -A DEB
    for p in relayd agentd tunnelctl; do
        f=$(ls -t "$PKGDIR"/"${p}"_*_*.deb 2>/dev/null | head -n1 || true)
        [ -n "$f" ] || fail "no ${p}_*.deb in $PKGDIR (build the packages first, or E2E_FROM=build to rehearse)"
        DEB[$p]=$(basename "$f")
    done
    host "ls -l $PKGDIR"
elif [ "$FROM" = build ]; then
    for b in relayd agentd tunnelctl; do
        [ -x "$BUILD_DIR/$b" ] || fail "E2E_FROM=build: no $BUILD_DIR/$b"
    done
    say "REHEARSAL (E2E_FROM=build): binaries from $BUILD_DIR, files from the repository, placed by hand"
else
    fail "E2E_FROM must be packages or build, not $FROM"
fi

STANDIN=${E2E_STANDIN:-$(ls -t target/release/stand-in-ollama target/debug/stand-in-ollama 2>/dev/null | head -n1 || true)}
[ -n "$STANDIN" ] && [ -x "$STANDIN" ] || fail "no stand-in-ollama binary (set E2E_STANDIN)"
STANDIN=$(realpath "$STANDIN")
say "stand-in Ollama: $STANDIN"

if [ -d "$ROOTFS" ]; then
    say "rootfs: $ROOTFS (cached, debootstrap skipped)"
else
    MIRROR=${E2E_MIRROR:-}
    if [ -z "$MIRROR" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
        MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$MIRROR" ] && [ -f /etc/apt/sources.list ]; then
        MIRROR=$(awk '$1=="deb" && $2 !~ /^\[/ {print $2; exit}' /etc/apt/sources.list)
    fi
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    rm -rf --one-file-system -- "$ROOTFS.partial"
    mkdir -p "$(dirname "$ROOTFS")"
    t=$(date +%s)
    say "\$ debootstrap --variant=minbase --include=$INCLUDE $SUITE $ROOTFS.partial $MIRROR"
    debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$ROOTFS.partial" "$MIRROR" \
        >"$ROOTFS.debootstrap.log" 2>&1 || { tail -n 30 "$ROOTFS.debootstrap.log"; fail "debootstrap (log: $ROOTFS.debootstrap.log)"; }
    rm -f "$ROOTFS.debootstrap.log"
    # Only a complete tree gets the cached name.
    mv "$ROOTFS.partial" "$ROOTFS"
    say "debootstrap took $(($(date +%s) - t)) s; $(du -sh "$ROOTFS" | cut -f1)"
fi
for f in usr/bin/curl usr/bin/openssl usr/bin/systemctl usr/sbin/useradd usr/bin/pgrep usr/bin/loginctl; do
    [ -e "$ROOTFS/$f" ] || fail "$ROOTFS lacks /$f: delete it to have it made again with --include=$INCLUDE"
done

EPHEMERAL_BEFORE=$(echo "$(dirname "$ROOTFS")"/.#machine."$(basename "$ROOTFS")"*)
NSPAWN_LOG=$(mktemp /tmp/e2e-nspawn.XXXXXX)
BINDS=(--bind-ro="$STANDIN":/usr/local/bin/stand-in-ollama)
if [ "$FROM" = packages ]; then
    BINDS+=(--bind-ro="$PKGDIR":/mnt/pkg)
else
    BINDS+=(--bind-ro="$BUILD_DIR":/mnt/build --bind-ro="$REPO/systemd":/mnt/src/systemd
            --bind-ro="$REPO/packaging":/mnt/src/packaging)
fi
say "\$ systemd-nspawn -D $ROOTFS --ephemeral --register=no --keep-unit --private-network ${BINDS[*]} --boot --console=pipe &"
systemd-nspawn -D "$ROOTFS" --ephemeral --register=no --keep-unit --private-network \
    --machine=tunnel-e2e "${BINDS[@]}" --boot --console=pipe >"$NSPAWN_LOG" 2>&1 &
NSPAWN_PID=$!

# The container's PID 1: the child of systemd-nspawn whose comm is systemd.
for _ in $(seq 1 150); do
    LEADER=$(ps -o pid=,comm= --ppid "$NSPAWN_PID" 2>/dev/null | awk '$2=="systemd"{print $1; exit}' || true)
    [ -n "$LEADER" ] && break
    kill -0 "$NSPAWN_PID" 2>/dev/null || { cat "$NSPAWN_LOG"; fail "systemd-nspawn exited"; }
    sleep 0.1
done
[ -n "$LEADER" ] || { cat "$NSPAWN_LOG"; fail "no container PID 1 within 15 s"; }
say "container PID 1 is host pid $LEADER"
wait_until "the container booted" 60 \
    'state=$(systemctl is-system-running 2>/dev/null); echo "$state"; [ "$state" = running ] || [ "$state" = degraded ]'
if [ "$OUT" = degraded ]; then run 'systemctl --no-pager --failed'; fi
# debootstrap leaves no /etc/hosts: name localhost (the relay's certificate
# name) for every resolver, not only curl's built-in one.
run 'printf "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n" > /etc/hosts; getent hosts localhost'

# ------------------------------------------------------------------ steps

section "1. install the packages; agentd enabled and started (not enrolled), relayd not"
if [ "$FROM" = packages ]; then
    # docs/INSTALL.md: the relay host's line, then the desktop's (one machine here).
    run "cd /mnt/pkg && dpkg -i ${DEB[tunnelctl]} ${DEB[relayd]}"
    run "cd /mnt/pkg && dpkg -i ${DEB[tunnelctl]} ${DEB[agentd]}"
    run 'dpkg-query -W -f='"'"'${Package} ${Version} ${Status}\n'"'"' relayd agentd tunnelctl'
    expect "three packages installed" '^relayd .* install ok installed'
    expect "agentd installed" '^agentd .* install ok installed'
    expect "tunnelctl installed" '^tunnelctl .* install ok installed'
    run 'dpkg-query -W -f='"'"'${Package} conffiles:${Conffiles}\n'"'"' relayd agentd'
    expect "relayd.toml is a conffile" '/etc/relayd/relayd.toml'
    expect "agentd.toml is a conffile" '/etc/agentd/agentd.toml'
else
    say "REHEARSAL: placing the files by hand where the packages put them"
    run 'set -e
for b in relayd agentd tunnelctl; do ln -s /mnt/build/$b /usr/bin/$b; done
install -m 0644 /mnt/src/systemd/relayd.service /mnt/src/systemd/relayd.socket /mnt/src/systemd/agentd.service /usr/lib/systemd/system/
install -D -m 0644 /mnt/src/systemd/user/agentd.service /usr/lib/systemd/user/agentd.service
install -d /usr/lib/sysusers.d /usr/lib/tmpfiles.d /etc/relayd /etc/agentd
install -m 0644 /mnt/src/packaging/sysusers.d/agentd.conf /mnt/src/packaging/sysusers.d/relayd.conf /usr/lib/sysusers.d/
install -m 0644 /mnt/src/packaging/tmpfiles.d/agentd.conf /mnt/src/packaging/tmpfiles.d/relayd.conf /usr/lib/tmpfiles.d/
install -m 0644 /mnt/src/packaging/relayd.toml /etc/relayd/relayd.toml
install -m 0644 /mnt/src/packaging/agentd.toml /etc/agentd/agentd.toml
systemd-sysusers agentd.conf relayd.conf
systemd-tmpfiles --create agentd.conf relayd.conf
systemctl daemon-reload'
fi
run 'ls -l /usr/bin/relayd /usr/bin/agentd /usr/bin/tunnelctl /usr/lib/systemd/system/relayd.service /usr/lib/systemd/system/relayd.socket /usr/lib/systemd/system/agentd.service /usr/lib/sysusers.d/agentd.conf /usr/lib/sysusers.d/relayd.conf /usr/lib/tmpfiles.d/agentd.conf /usr/lib/tmpfiles.d/relayd.conf /etc/relayd/relayd.toml /etc/agentd/agentd.toml'
run 'relayd --version; agentd --version; tunnelctl --version'
run 'getent passwd relayd agentd; getent group relayd agentd'
expect "sysusers created user relayd" '^relayd:x:[0-9]+:[0-9]+:'
expect "sysusers created user agentd" '^agentd:x:[0-9]+:[0-9]+:'
run 'stat -c "%A %U:%G %n" /etc/relayd /etc/agentd'
expect "/etc/relayd is 0750 root:relayd (tmpfiles.d)" '^drwxr-x--- root:relayd /etc/relayd$'
expect "/etc/agentd is 0750 root:agentd (tmpfiles.d)" '^drwxr-x--- root:agentd /etc/agentd$'
if [ "$FROM" = packages ]; then
    # Debian's convention (dh_installsystemd): agentd enabled and started on
    # install; not enrolled, it waits and says how to enroll. relayd not:
    # it would listen on 443 before it has a certificate.
    run 'systemctl is-active relayd.socket relayd.service agentd.service || true'
    expect "relayd.socket, relayd inactive, agentd active after install" '^inactive
inactive
active$'
    run 'systemctl is-enabled relayd.socket relayd.service agentd.service || true'
    expect "relayd.socket, relayd disabled, agentd enabled after install" '^disabled
disabled
enabled$'
    run 'pgrep -a -x "relayd|agentd" || echo "no relayd or agentd process"'
    expect_not "no relayd process after install" ' /usr/bin/relayd'
    run 'systemctl status agentd'
    expect "agentd says how to enroll in its Status line" 'Status: "not enrolled: run tunnelctl enroll wss://RELAY \(credential on stdin\)"'
    run 'tunnelctl status'
    expect "tunnelctl status: a running agent, not enrolled" '^agentd [0-9.]+: not enrolled$'
else
    run 'systemctl start agentd'
fi
run 'ss -Hltn "sport = :443" | wc -l'
expect "nothing listens on 443 after install" '^0$'
# The shipped agentd.toml works as is (it is about to be replaced).
run 'runuser -u agentd -- agentd --config /etc/agentd/agentd.toml --check-config >/dev/null && echo "shipped agentd.toml: valid"'
# The shipped relayd.toml works as is too (replaced in step 2).
run 'runuser -u relayd -- relayd --config /etc/relayd/relayd.toml --check-config >/dev/null && echo "shipped relayd.toml: valid"'
expect "the shipped relayd.toml loads" 'shipped relayd.toml: valid'

section "2. private CA, relay certificate, configuration; the relay, then the desktop: enable --now; agentd \"not enrolled\""
run 'set -e; mkdir -p /root/pki; cd /root/pki
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout ca.key -out ca.pem -subj "/CN=tunnel e2e test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
printf "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n" > leaf.ext
for n in 1 2; do
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout leaf$n.key -subj /CN=localhost -out leaf$n.csr 2>/dev/null
    openssl x509 -req -in leaf$n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile leaf.ext -out leaf$n.pem 2>/dev/null
done
openssl verify -CAfile ca.pem leaf1.pem leaf2.pem
openssl x509 -in leaf1.pem -noout -subject -ext subjectAltName'
expect "leaf certificates verify against the CA" 'leaf2.pem: OK'
run 'set -e
install -d -m 0750 -o root -g relayd /etc/relayd/tls
install -m 0640 -o root -g relayd /root/pki/leaf1.pem /etc/relayd/tls/fullchain.pem
install -m 0600 -o relayd -g relayd /root/pki/leaf1.key /etc/relayd/tls/privkey.pem
relayd key generate --out /etc/relayd/signing.pem
chown relayd:relayd /etc/relayd/signing.pem
cat > /etc/relayd/relayd.toml <<EOF
# written by tests/systemd/e2e.sh; the listener is relayd.socket (port 443)
state_dir = "/var/lib/relayd"

[[users]]
id = "alice"
public = true

[[users]]
id = "dave"
public = true

[identity]
signing_key_file = "/etc/relayd/signing.pem"

[tls]
cert_file = "/etc/relayd/tls/fullchain.pem"
key_file = "/etc/relayd/tls/privkey.pem"
EOF
chown root:relayd /etc/relayd/relayd.toml; chmod 0640 /etc/relayd/relayd.toml
install -m 0640 -o root -g agentd /root/pki/ca.pem /etc/agentd/relay-ca.pem
cat > /etc/agentd/agentd.toml <<EOF
# written by tests/systemd/e2e.sh: no relay, no token (tunnelctl enroll gives them)
[tls]
ca_file = "/etc/agentd/relay-ca.pem"
EOF
chown root:agentd /etc/agentd/agentd.toml; chmod 0640 /etc/agentd/agentd.toml
ls -lR /etc/relayd /etc/agentd; cat /etc/relayd/relayd.toml /etc/agentd/agentd.toml'
run 'runuser -u relayd -- relayd --config /etc/relayd/relayd.toml --check-config | grep -E "\"(cert_file|key_file|state_dir|signing_key_file)\"|alice"'
run 'runuser -u agentd -- agentd --config /etc/agentd/agentd.toml --check-config | grep -E "\"(ca_file|target)\""'
# The model server first, so agentd's first health check finds it.
run 'systemd-run --unit=ollama /usr/local/bin/stand-in-ollama --listen 127.0.0.1:11434'
wait_until "the stand-in Ollama answers" 15 'curl -sS --max-time 2 http://127.0.0.1:11434/api/version'
# docs/INSTALL.md, "The relay".
run 'systemctl enable --now relayd.socket relayd'
run 'systemctl is-active relayd.socket relayd'
expect "relayd.socket and relayd active" '^active
active$'
run 'systemctl status relayd.socket'
expect "the socket unit listens on 443" 'Listen: .*:443'
run 'systemctl status relayd'
expect "relayd reports its status over sd_notify" 'Status: "serving 0 tunnels, 0 streams in flight"'
run 'ss -Hltnp "sport = :443"'
run 'tunnelctl --daemon relayd status'
expect "tunnelctl --daemon relayd status: serving" '^relayd [0-9.]+: serving$'
expect "relayd serves TLS on the inherited socket" 'tls +/etc/relayd/tls/fullchain.pem'
# docs/INSTALL.md, "The desktop": the package started agentd; a private
# CA in agentd.toml takes a restart.
run 'systemctl restart agentd'
run 'systemctl is-active agentd'
expect "agentd active" '^active$'
run 'systemctl status agentd'
expect "agentd says \"not enrolled\" in its Status line" 'Status: "not enrolled: run tunnelctl enroll wss://RELAY \(credential on stdin\)"'
run 'tunnelctl status'
expect "tunnelctl status (no --daemon) now finds agentd: not enrolled" '^agentd [0-9.]+: not enrolled$'

section "3. enroll: a credential from relayd, tunnelctl enroll, agentd connected"
# docs/INSTALL.md: the relay issues the credential, the desktop enrolls
# with it on stdin (one machine here, both in /root).
run 'umask 077    # the credential file is a secret: yours only
tunnelctl --daemon relayd token issue --user alice --role agent > alice.credential'
expect "relayd issued an agent credential" 'agent credential c_[0-9a-f]+ for alice'
run 'stat -c "%a %s bytes %n" alice.credential; cut -c1-8 alice.credential'
expect "the credential file is 0600" '^600 '
expect "the credential has the tcred_ shape" '^tcred_c_'
run 'tunnelctl enroll wss://localhost < alice.credential'
expect "enrolled and connected" '^enrolled with wss://localhost/ws/tunnel \(stored in /var/lib/agentd\); connected$'
wait_until "agentd's STATUS says connected" 20 \
    'systemctl show -p StatusText agentd; systemctl show -p StatusText --value agentd | grep -q "^connected to localhost"'
run 'systemctl status agentd'
expect "systemctl status shows \"connected to localhost, 0 streams\"" 'Status: "connected to localhost, 0 streams'
run 'tunnelctl status'
expect "tunnelctl status: connected" '^agentd .*: connected'
run 'ls -l /var/lib/agentd; cat /var/lib/agentd/enrollment.toml'
expect "the enrollment is stored" 'relay = "wss://localhost/ws/tunnel"'
run 'tunnelctl --daemon relayd tunnels'
expect "relayd lists alice's tunnel" '^alice +s_[0-9a-f]+ '

section "4. a streamed request through the tunnel"
run "curl -sS -N --fail-with-body --cacert /root/pki/ca.pem -D /root/chat.headers https://localhost/api/tunnel/alice/api/chat -d '$CHAT_BODY,\"options\":{\"num_predict\":8}}'"
lines=$(grep -c '^{' <<<"$OUT" || true)
[ "$lines" -eq 9 ] || fail "expected 9 NDJSON lines (8 tokens + done), got $lines"
ok "9 NDJSON lines (8 tokens, then done)"
[ "$(grep -c '"done":false' <<<"$OUT")" -eq 8 ] || fail "expected 8 token lines"
tail -n1 <<<"$OUT" | grep -q '"done":true' || fail "the last line is not the done line"
ok "the stream ends with \"done\":true"
run 'cat /root/chat.headers'
expect "HTTP 200" '^HTTP/1.1 200'
expect "NDJSON content type" '^content-type: application/x-ndjson'

section "5. who may use the control socket"
run 'tunnelctl --daemon agentd status'
expect "root: status works" 'connected'
run 'useradd -m bob && useradd -m carol'
# docs/INSTALL.md: "sudo usermod -aG agentd $USER" (runuser starts with the
# groups as they are now, like a new login).
run 'usermod -aG agentd bob'
run 'id bob; id carol'
expect "bob is in group agentd" '^uid=[0-9]+\(bob\).*[0-9]+\(agentd\)'
run 'runuser -u bob -- tunnelctl --daemon agentd status'
expect "bob (group agentd): status works" '^agentd .*: connected'
run 'runuser -u bob -- tunnelctl status'
expect "bob: status without --daemon finds agentd" '^agentd .*: connected'
run -e 77 'runuser -u bob -- tunnelctl --daemon agentd reconnect'
expect "bob may not change agentd" 'permission denied'
run -e 77 'runuser -u carol -- tunnelctl --daemon agentd status'
expect "carol (not in group agentd) is refused" 'permission denied.*group agentd'
run -e 77 'runuser -u carol -- tunnelctl status'
expect "carol without --daemon: refused too (not \"not running\")" 'permission denied'

section "6. an agent of your own: the user unit (dave, lingering)"
# docs/INSTALL.md, "An agent of your own": dave is in group agentd (he copies
# /etc/agentd/agentd.toml, 0640 root:agentd); lingering starts his user
# manager without a login session.
run 'useradd -m dave && usermod -aG agentd dave && id dave'
DAVE_UID=$(ct 'id -u dave')
run 'loginctl enable-linger dave'
wait_until "dave's user manager (user@$DAVE_UID.service) runs" 30 \
    "systemctl is-active user@$DAVE_UID.service && ls /run/user/$DAVE_UID/bus /run/user/$DAVE_UID/systemd/private"
say "# dave\$ CMD below is: $(as_user dave CMD)"
run_as dave 'mkdir -p ~/.config/agentd && cp /etc/agentd/agentd.toml ~/.config/agentd/'
run_as dave 'systemctl --user enable --now agentd'
run_as dave 'systemctl --user is-active agentd'
expect "dave's agentd (user unit) active" '^active$'
run_as dave 'systemctl --user status agentd'
expect "dave's agentd says \"not enrolled\"" 'Status: "not enrolled'
run_as dave 'tunnelctl status'
expect "dave: tunnelctl status finds his own agentd (\$XDG_RUNTIME_DIR), not enrolled" '^agentd [0-9.]+: not enrolled$'
run "stat -c '%A %U:%G %n' /run/user/$DAVE_UID/agentd /run/user/$DAVE_UID/agentd/control.sock"
expect "his control socket is his only" "^drwx------ dave:dave /run/user/$DAVE_UID/agentd\$"
run -e 77 "runuser -u bob -- tunnelctl --socket /run/user/$DAVE_UID/agentd/control.sock status"
expect "bob (group agentd) cannot reach dave's agent" 'permission denied'
# His credential (relayd knows user dave), handed over as my.credential (0600).
run 'umask 077; tunnelctl --daemon relayd token issue --user dave --role agent > dave.credential
install -o dave -g dave -m 0600 dave.credential /home/dave/my.credential'
expect "relayd issued dave's credential" 'agent credential c_[0-9a-f]+ for dave'
DAVE_CRED=$(grep -o 'credential c_[0-9a-f]*' <<<"$OUT" | cut -d' ' -f2)
run_as dave 'tunnelctl enroll wss://localhost < my.credential'
expect "dave enrolled and connected" '^enrolled with wss://localhost/ws/tunnel \(stored in /home/dave/.config/agentd\); connected$'
wait_until "dave's agentd STATUS says connected" 20 \
    "$(as_user dave 'systemctl --user show -p StatusText --value agentd | grep "^connected to localhost"')"
run_as dave 'tunnelctl status'
expect "dave: tunnelctl status: connected" '^agentd [0-9.]+: connected$'
run_as dave 'ls -la ~/.config/agentd ~/.local/state/agentd 2>&1 || true'
expect "systemd 252: the user unit's state (StateDirectory=) is ~/.config/agentd" 'enrollment.toml'
run 'tunnelctl --daemon relayd tunnels'
expect "relayd lists dave's tunnel" '^dave +s_[0-9a-f]+ '
expect "and alice's" '^alice +s_[0-9a-f]+ '
run "curl -sS -N --fail-with-body --cacert /root/pki/ca.pem https://localhost/api/tunnel/dave/api/chat -d '$CHAT_BODY,\"options\":{\"num_predict\":3}}'"
expect "a request through dave's tunnel (his user unit) streams to the end" '"done":true'

section "7. rotate-token while a slow stream runs"
run 'tunnelctl --daemon relayd tunnels'
SESSION=$(awk '$1 == "alice" {print $2}' <<<"$OUT")
AUTH_BEFORE=$(grep '^alice ' <<<"$OUT" | grep -o 'c_[0-9a-f]\{16\}' | head -n1)
[ -n "$SESSION" ] && [ -n "$AUTH_BEFORE" ] || fail "no session or credential id in the answer above"
say "session $SESSION, credential $AUTH_BEFORE"
slow_start 20 250
run 'tunnelctl rotate-token'
expect "credential rotated" '^credential rotated: now c_[0-9a-f]+, stored in /var/lib/agentd/credential; the old one is revoked$'
AUTH_NEW=$(grep -o 'now c_[0-9a-f]*' <<<"$OUT" | cut -d' ' -f2)
run 'tunnelctl --daemon agentd status | grep -E "in flight|session"; tunnelctl --daemon relayd tunnels'
expect "agentd counts the stream in flight" 'in flight +1$'
expect "relayd counts the stream in flight" "^alice +$SESSION +.* 1 +"
slow_finish 20 "the rotation"
run 'tunnelctl --daemon relayd tunnels'
expect "the same session $SESSION is up" "^alice +$SESSION "
expect "now authorized by the new credential $AUTH_NEW" "$AUTH_NEW"
run 'tunnelctl --daemon agentd status'
expect "agentd: same session, no reconnect" "session +$SESSION"
expect "no reconnect" 'sessions +1 \(0 reconnects\)'
run 'cut -c1-24 /var/lib/agentd/credential'
expect "the new credential is stored" "^tcred_$AUTH_NEW"
# The old credential is revoked: a WebSocket handshake with it gets 401.
run 'curl -sS -o /dev/null -w "%{http_code}\n" --cacert /root/pki/ca.pem -H "Authorization: Bearer $(cat /root/alice.credential)" -H "Connection: Upgrade" -H "Upgrade: websocket" -H "Sec-WebSocket-Version: 13" -H "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==" https://localhost/ws/tunnel'
expect "the old credential is refused (401)" '^401$'

section "8. logs: the journal (access lines and their fields), tunnelctl log-level"
# docs/INSTALL.md, "Logs", in its order; the log level first, so that the
# last line of agentd's journal is the access line of the request below.
run -t 12 'journalctl -u agentd'
expect "journalctl -u agentd: the agent's life" 'connected to the relay'
expect "and one line per request, saying what it was" '^[A-Z][a-z]{2} [0-9 :]+ [^ ]+ agentd\[[0-9]+\]: (GET|POST) /[^ ]* [0-9]{3} [0-9]+ ms [a-z_]+$'
run 'tunnelctl log-level debug'
expect "log-level debug: agentd's filter is debug now" '^log filter: debug \(was info; until the next restart\)$'
run 'tunnelctl log-level'
expect "agentd reports the debug filter" '^log filter: debug '
run 'tunnelctl log-level info'
expect "log-level info: back to info" '^log filter: info \(was debug; until the next restart\)$'
run "curl -sS -N --fail-with-body --cacert /root/pki/ca.pem https://localhost/api/tunnel/alice/api/chat -d '$CHAT_BODY,\"options\":{\"num_predict\":2}}' | tail -n1"
expect "a request" '"done":true'
wait_until "the last line of agentd's journal is its access line" 10 \
    'out=$(journalctl -u agentd -o json-pretty -n 1); echo "$out"; grep -q "\"REQUEST_ID\"" <<<"$out"'
for f in SESSION REQUEST_ID METHOD PATH STATUS DURATION_MS OUTCOME; do
    expect "journalctl -u agentd -o json-pretty -n 1: field $f" "\"$f\" : \"[^\"]+\""
done
REQ=$(sed -n 's/.*"REQUEST_ID" : "\([^"]*\)".*/\1/p' <<<"$OUT")
run "journalctl -u agentd REQUEST_ID=$REQ"
expect "journalctl -u agentd REQUEST_ID=$REQ finds the access line" 'agentd\[[0-9]+\]: POST /api/chat 200 [0-9]+ ms ok$'
# The streamed chat of the rotation step, field by field.
run 'journalctl -u agentd -o json --no-pager TARGET=access PATH=/api/chat | tail -n1'
for f in SESSION REQUEST_ID METHOD PATH STATUS DURATION_MS OUTCOME; do
    expect "journal field $f" "\"$f\":\"[^\"]+\""
done
expect "PATH is /api/chat" '"PATH":"/api/chat"'
expect "STATUS is 200" '"STATUS":"200"'
REQ=$(sed -n 's/.*"REQUEST_ID":"\([^"]*\)".*/\1/p' <<<"$OUT")
SES=$(sed -n 's/.*"SESSION":"\([^"]*\)".*/\1/p' <<<"$OUT")
# Stream ids restart with each session (req_1, req_2, ...): SESSION and
# REQUEST_ID together name one request.
run "journalctl -u agentd -o verbose SESSION=$SES REQUEST_ID=$REQ"
expect "journalctl REQUEST_ID=$REQ finds the access line" 'MESSAGE=POST /api/chat 200 [0-9]+ ms ok'
expect "with OUTCOME=ok" '^ *OUTCOME=ok$'
run "journalctl -u relayd --no-pager -o cat --output-fields=REQUEST_ID,USER_HASH,METHOD,PATH,STATUS,DURATION_MS,OUTCOME SESSION=$SES REQUEST_ID=$REQ | tail -n 7"
expect "relayd logged the same request" "^$REQ\$"
expect "relayd names the user by its keyed hash only" '^u_[0-9a-f]{12}$'

section "9. watchdog: a stopped agentd is killed and restarted"
run 'mkdir -p /etc/systemd/system/agentd.service.d && printf "[Service]\nWatchdogSec=4s\n" > /etc/systemd/system/agentd.service.d/50-e2e-watchdog.conf && systemctl daemon-reload && systemctl restart agentd && systemctl show -p WatchdogUSec agentd'
expect "WatchdogSec=4s in force" '^WatchdogUSec=4s$'
wait_until "agentd connected again" 20 'systemctl show -p StatusText --value agentd | grep "^connected to localhost"'
run 'systemctl show -p MainPID agentd'
BEFORE_PID=$(sed -n 's/^MainPID=//p' <<<"$OUT")
run 'systemctl show -p NRestarts agentd'
BEFORE_N=$(sed -n 's/^NRestarts=//p' <<<"$OUT")
run "kill -STOP $BEFORE_PID; date +%T"
wait_until "systemd killed and restarted agentd" 30 \
    "[ \"\$(systemctl show -p NRestarts --value agentd)\" -gt $BEFORE_N ] && [ \"\$(systemctl show -p ActiveState --value agentd)\" = active ] && date +%T"
run 'systemctl show -p MainPID agentd'
AFTER_PID=$(sed -n 's/^MainPID=//p' <<<"$OUT")
run 'systemctl show -p NRestarts agentd'
AFTER_N=$(sed -n 's/^NRestarts=//p' <<<"$OUT")
[ "$AFTER_N" -eq $((BEFORE_N + 1)) ] || fail "NRestarts $BEFORE_N -> $AFTER_N, expected +1"
[ "$AFTER_PID" != "$BEFORE_PID" ] && [ "$AFTER_PID" != 0 ] || fail "MainPID $BEFORE_PID -> $AFTER_PID"
ok "NRestarts $BEFORE_N -> $AFTER_N, MainPID $BEFORE_PID -> $AFTER_PID"
run "journalctl -u agentd -o short-precise | grep -E 'Watchdog timeout|status=6/ABRT|result .watchdog.|Scheduled restart'"
expect "the journal says watchdog timeout" 'agentd.service: Watchdog timeout \(limit 4s\)!'
wait_until "agentd connected again with the stored (rotated) credential" 20 \
    'systemctl show -p StatusText --value agentd | grep "^connected to localhost"'

section "10. reload: relayd with a new certificate (tunnel stays, new handshakes see it); agentd"
wait_until "relayd lists exactly one tunnel for alice" 20 \
    'out=$(tunnelctl --daemon relayd tunnels); echo "$out"; [ "$(grep -c "^alice " <<<"$out")" = 1 ]'
run 'tunnelctl --daemon relayd tunnels'
SESSION=$(awk '$1 == "alice" {print $2}' <<<"$OUT")
[ -n "$SESSION" ] || fail "no session id"
run 'systemctl show -p MainPID,NRestarts relayd'
RELAYD_BEFORE=$OUT
FP='openssl s_client -connect localhost:443 -servername localhost -CAfile /root/pki/ca.pem </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256'
run "$FP"
FP_OLD=$OUT
run 'openssl x509 -in /root/pki/leaf2.pem -noout -fingerprint -sha256'
FP_NEW=$OUT
[ "$FP_OLD" != "$FP_NEW" ] || fail "the new certificate has the old fingerprint"
slow_start 12 250
run 'set -e
install -m 0640 -o root -g relayd /root/pki/leaf2.pem /etc/relayd/tls/fullchain.pem.new
install -m 0600 -o relayd -g relayd /root/pki/leaf2.key /etc/relayd/tls/privkey.pem.new
mv /etc/relayd/tls/fullchain.pem.new /etc/relayd/tls/fullchain.pem
mv /etc/relayd/tls/privkey.pem.new /etc/relayd/tls/privkey.pem
systemctl reload relayd
systemctl show -p ActiveState,SubState,StatusText relayd'
expect "relayd active after the reload" '^ActiveState=active$'
run 'journalctl -u relayd --no-pager -o cat | tail -n 3'
expect "relayd logged the reload" 'TLS certificate and key reloaded'
slow_finish 12 "the reload"
run "$FP"
[ "$OUT" = "$FP_NEW" ] || fail "a fresh TLS connection does not see the new certificate"
ok "a fresh TLS connection sees the new certificate (fingerprint changed)"
run 'systemctl show -p MainPID,NRestarts relayd'
[ "$OUT" = "$RELAYD_BEFORE" ] || fail "relayd restarted instead of reloading"
ok "relayd was not restarted"
run 'tunnelctl --daemon relayd tunnels'
expect "the same session $SESSION is still up" "^alice +$SESSION "
run 'tunnelctl --daemon agentd status'
expect "agentd still on session $SESSION" "session +$SESSION"
run "curl -sS -N --fail-with-body --cacert /root/pki/ca.pem https://localhost/api/tunnel/alice/api/chat -d '$CHAT_BODY,\"options\":{\"num_predict\":3}}'"
expect "a request over the new certificate and the old tunnel works" '"done":true'

# docs/INSTALL.md, "Reloading": agentd reads its token file again; it keeps
# its process, its session and the streams in flight.
run 'systemctl show -p MainPID agentd'
AGENTD_PID=$OUT
slow_start 8 250
run 'systemctl reload agentd'
run 'systemctl show -p MainPID agentd; systemctl is-active agentd'
[ "$(head -n1 <<<"$OUT")" = "$AGENTD_PID" ] || fail "agentd restarted instead of reloading"
expect "agentd active after the reload, same MainPID" '^active$'
slow_finish 8 "agentd's reload"
run 'tunnelctl status'
expect "agentd still on session $SESSION after its reload" "session +$SESSION"
expect "no reconnect" 'sessions +1 \(0 reconnects\)'

section "11. upgrade: dpkg -i over the installed packages; the edited configuration, the enrollment and the running agents stay"
# The watchdog drop-in is this test's (an administrator's file), not the package's.
run 'rm -r /etc/systemd/system/agentd.service.d && systemctl daemon-reload'
if [ "$FROM" = packages ]; then
    say "# No newer version exists here: the same files go in again, which runs the same"
    say "# maintainer-script paths as an upgrade (postinst configure with the installed version)."
    run 'echo "# edited by the administrator before the upgrade" >> /etc/agentd/agentd.toml; cat /etc/agentd/agentd.toml'
    run 'md5sum /etc/agentd/agentd.toml /etc/relayd/relayd.toml /var/lib/agentd/enrollment.toml /var/lib/agentd/credential'
    SUMS_BEFORE=$OUT
    run 'systemctl show -p MainPID relayd; systemctl show -p MainPID agentd'
    PIDS_BEFORE=$OUT
    run_as dave 'systemctl --user show -p MainPID agentd'
    DAVE_PID_BEFORE=$OUT
    # docs/INSTALL.md, "Upgrading": the relay host's line, then the desktop's.
    run "cd /mnt/pkg && dpkg -i ${DEB[tunnelctl]} ${DEB[relayd]}"
    run "cd /mnt/pkg && dpkg -i ${DEB[tunnelctl]} ${DEB[agentd]}"
    run 'dpkg-query -W -f='"'"'${Package} ${Version} ${Status}\n'"'"' relayd agentd tunnelctl'
    expect_not "all three installed" ' (deinstall|half|unpacked|config-files)'
    run 'md5sum /etc/agentd/agentd.toml /etc/relayd/relayd.toml /var/lib/agentd/enrollment.toml /var/lib/agentd/credential'
    [ "$OUT" = "$SUMS_BEFORE" ] || fail "a configuration file or the enrollment changed in the upgrade"
    ok "the edited agentd.toml, relayd.toml, the enrollment and the credential are unchanged"
    run 'tail -n1 /etc/agentd/agentd.toml'
    expect "the administrator's edit is there" '^# edited by the administrator before the upgrade$'
    run 'systemctl is-active relayd.socket relayd agentd'
    expect "relayd.socket, relayd, agentd active after the upgrade" '^active
active
active$'
    run 'systemctl show -p MainPID relayd; systemctl show -p MainPID agentd'
    PIDS_AFTER=$OUT
    [ "$(head -n1 <<<"$PIDS_AFTER")" != "$(head -n1 <<<"$PIDS_BEFORE")" ] || fail "relayd was not restarted by the upgrade"
    [ "$(tail -n1 <<<"$PIDS_AFTER")" != "$(tail -n1 <<<"$PIDS_BEFORE")" ] || fail "agentd was not restarted by the upgrade"
    ok "the packages restarted the running relayd and agentd (new MainPIDs: $(echo $PIDS_BEFORE) -> $(echo $PIDS_AFTER))"
    wait_until "agentd connected again, with the stored enrollment" 30 \
        'systemctl show -p StatusText --value agentd | grep "^connected to localhost"'
    run 'tunnelctl status'
    expect "tunnelctl status: connected" '^agentd [0-9.]+: connected$'
    run "curl -sS -N --fail-with-body --cacert /root/pki/ca.pem https://localhost/api/tunnel/alice/api/chat -d '$CHAT_BODY,\"options\":{\"num_predict\":3}}' | tail -n1"
    expect "a request through alice's tunnel after the upgrade" '"done":true'
    # A user unit is not the package's to restart.
    run_as dave 'systemctl --user show -p MainPID agentd'
    [ "$OUT" = "$DAVE_PID_BEFORE" ] || fail "dave's agentd (user unit) was restarted by the package"
    ok "dave's agentd (user unit) kept running: $OUT"
    run_as dave 'systemctl --user restart agentd'
    wait_until "dave's agentd connected again" 30 \
        "$(as_user dave 'systemctl --user show -p StatusText --value agentd | grep "^connected to localhost"')"
else
    say "REHEARSAL: no package to upgrade"
fi

section "12. remove, then purge: nothing of the packages remains"
CHECK_PATHS='/usr/bin/relayd /usr/bin/agentd /usr/bin/tunnelctl /usr/lib/systemd/system/relayd.service /usr/lib/systemd/system/relayd.socket /usr/lib/systemd/system/agentd.service /usr/lib/systemd/user/agentd.service /usr/lib/sysusers.d/agentd.conf /usr/lib/sysusers.d/relayd.conf /usr/lib/tmpfiles.d/agentd.conf /usr/lib/tmpfiles.d/relayd.conf /etc/agentd /etc/relayd /var/lib/agentd /var/lib/relayd /run/agentd /run/relayd'
if [ "$FROM" = packages ]; then
    run 'dpkg-query -L relayd agentd tunnelctl | sort -u | while read -r f; do [ -z "$f" ] || [ -d "$f" ] || echo "$f"; done > /root/package-files; wc -l < /root/package-files; cat /root/package-files'
fi
# docs/INSTALL.md, "Rotating credentials": a revoked credential's tunnel closes at once.
run "tunnelctl --daemon relayd token revoke $DAVE_CRED"
expect "dave's credential revoked, his session ended" "^$DAVE_CRED revoked; 1 live session\\(s\\) ended$"
wait_until "relayd no longer lists dave's tunnel" 10 \
    'out=$(tunnelctl --daemon relayd tunnels); echo "$out"; ! grep -q "^dave " <<<"$out"'
wait_until "dave's agent says why it is not connected" 10 \
    "$(as_user dave 'out=$(tunnelctl status); echo "$out"; grep -q "last error .*credential was revoked" <<<"$out"')"
expect_not "dave's agent is not connected any more" ': connected$'
# docs/INSTALL.md, "Removing": an agent of your own first, then the desktop.
run_as dave 'systemctl --user disable --now agentd'
run_as -e 3 dave 'systemctl --user is-active agentd'
expect "dave's agentd stopped" '^inactive$'
run 'systemctl disable --now agentd'
run -e 3 'systemctl is-active agentd'
expect "agentd stopped" '^inactive$'
if [ "$FROM" = packages ]; then
    run 'dpkg --remove agentd'
    run 'dpkg-query -W -f='"'"'${Package} ${Status}\n'"'"' agentd'
    expect "agentd: removed, its configuration kept" '^agentd deinstall ok config-files$'
    run 'ls -l /etc/agentd /var/lib/agentd; tail -n1 /etc/agentd/agentd.toml'
    expect "/etc/agentd/agentd.toml stays" 'agentd.toml$'
    expect "with the administrator's edit" '^# edited by the administrator before the upgrade$'
    expect "/var/lib/agentd stays (the enrollment)" 'enrollment.toml$'
    run 'for f in /usr/bin/agentd /usr/lib/systemd/system/agentd.service /usr/lib/systemd/user/agentd.service; do [ -e "$f" ] && echo "LEFT: $f" || echo "gone: $f"; done'
    expect_not "the binary and the units are gone" 'LEFT:'
    # Purge removes the package's files and agentd's state; files the
    # administrator added under /etc/agentd stay, and the purge names them.
    run 'dpkg --purge agentd'
    expect "the purge says what it kept" '^agentd: purge kept /etc/agentd: it holds files the package did not install:$'
    expect "the administrator's relay CA, by name" '^  /etc/agentd/relay-ca.pem$'
    run 'ls -A /etc/agentd; ls -d /var/lib/agentd 2>&1 || true'
    expect "/etc/agentd holds only the administrator's file (agentd.toml gone)" '^relay-ca.pem$'
    expect_not "agentd.toml gone with the purge" 'agentd.toml'
    expect "/var/lib/agentd gone with the purge" "cannot access '/var/lib/agentd'"
    # The relay host, then tunnelctl (agentd and relayd depend on it).
    run 'systemctl disable --now relayd.socket relayd'
    run 'dpkg --purge relayd'
    expect "the purge says what it kept" '^relayd: purge kept /etc/relayd: it holds files the package did not install:$'
    expect "the certificate, by name" '^  /etc/relayd/tls/fullchain.pem$'
    run 'find /etc/relayd; ls -d /var/lib/relayd 2>&1 || true'
    expect_not "relayd.toml gone with the purge" 'relayd.toml'
    expect "/var/lib/relayd gone with the purge" "cannot access '/var/lib/relayd'"
    # docs/INSTALL.md, "Removing": what you added yourself is yours to remove.
    run 'rm -r /etc/agentd /etc/relayd'
    run 'dpkg --purge tunnelctl'
    run 'dpkg-query -W -f='"'"'${Package} ${Status}\n'"'"' relayd agentd tunnelctl 2>&1 || true'
    expect_not "dpkg knows none of the three any more (not even config-files)" ' (install|deinstall|purge) ok '
    expect "dpkg: no packages found" 'no packages found matching'
    run 'left=0; while read -r f; do if [ -e "$f" ] || [ -L "$f" ]; then echo "LEFT: $f"; left=1; fi; done < /root/package-files; echo "checked $(wc -l < /root/package-files) packaged files"; exit $left'
else
    say "REHEARSAL: removing by hand what step 1 placed"
    run 'systemctl disable --now relayd.socket relayd agentd
rm -f /usr/bin/relayd /usr/bin/agentd /usr/bin/tunnelctl /usr/lib/systemd/system/relayd.service /usr/lib/systemd/system/relayd.socket /usr/lib/systemd/system/agentd.service /usr/lib/systemd/user/agentd.service /usr/lib/sysusers.d/agentd.conf /usr/lib/sysusers.d/relayd.conf /usr/lib/tmpfiles.d/agentd.conf /usr/lib/tmpfiles.d/relayd.conf
rm -rf /etc/agentd /etc/relayd /var/lib/agentd /var/lib/relayd
systemctl daemon-reload'
fi
run 'left=0; for f in '"$CHECK_PATHS"'; do if [ -e "$f" ] || [ -L "$f" ]; then echo "LEFT: $f"; left=1; else echo "gone: $f"; fi; done; exit $left'
ok "binaries, units, sysusers/tmpfiles entries, configuration, state and runtime directories are gone"
run 'find /etc/systemd /usr/lib/systemd /var/lib/systemd /usr/share/man /usr/share/doc /usr/share/bash-completion /usr/share/zsh /usr/share/fish \( -name "*relayd*" -o -name "*agentd*" -o -name "*tunnelctl*" \) 2>/dev/null | sed "s/^/LEFT: /"; echo "searched /etc/systemd /usr/lib/systemd /var/lib/systemd (deb-systemd-helper state) /usr/share/{man,doc,bash-completion,zsh,fish}"'
expect_not "no unit, enablement symlink, mask, helper state, man page, doc or completion left" 'LEFT:'
run 'systemctl is-active relayd.socket relayd agentd || true; pgrep -a -x "relayd|agentd" || echo "no relayd or agentd process"; ss -Hltn "sport = :443" | wc -l'
expect_not "no unit active" '^(active|activating)$'
expect "no daemon process" 'no relayd or agentd process'
run 'systemctl list-units --all --no-legend "relayd*" "agentd*" | grep -v "not-found" || true'
expect_not "systemd knows no relayd/agentd unit" '(relayd|agentd)\.(service|socket) +loaded'
run 'getent passwd relayd agentd || true'
say "(the system users stay after a purge, as Debian does for system users)"
run 'ls /home/dave/.config/agentd'
expect "dave's own configuration and enrollment stay (no package touches them)" '^enrollment.toml$'

section "13. .rpm: inspection on the host, not an install"
shopt -s nullglob
RPMS=("$PKGDIR"/*.rpm)
shopt -u nullglob
if [ ${#RPMS[@]} -eq 0 ]; then
    say "no .rpm in $PKGDIR: nothing to inspect"
else
    say "No Fedora/EL root can be made here: this INSPECTS the .rpm files (rpm -qpl, rpm -i --test"
    say "against an empty database, no dependencies); it is NOT an install and runs no scriptlet."
    command -v rpm >/dev/null || host "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rpm"
    for r in "${RPMS[@]}"; do
        host "rpm -qpi $r 2>/dev/null | grep -E '^(Name|Version|Release|Architecture) *:'"
        host "rpm -qpl $r"
        host "rpm -qp --scripts $r"
        db=$(mktemp -d)
        host "rpm -i --test --nodeps --dbpath $db $r && echo 'rpm -i --test: would install'"
        rm -rf "$db"
    done
fi
section "done"
