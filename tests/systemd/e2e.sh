#!/usr/bin/env bash
# End-to-end test of the Debian packages under a real systemd, driven by
# docs/INSTALL.md: boots a Debian bookworm rootfs with systemd-nspawn
# (--ephemeral: the cached base stays pristine) and runs the page's command
# blocks, taken from the page itself (each block is marked in its source,
# `<!-- e2e: NAME -->`), line by line as written there, `sudo` and all, in
# a login session of the user the page addresses (`admin`, who may use
# sudo; `dave` for the user unit). Between blocks it only reads (check: a
# fixed list of read-only commands); what the page assumes of the world is
# set up first and printed as "fixture"; experiments beyond the page (a
# hung daemon, an unreadable key, an edited configuration) come after the
# first answer and are printed as "experiment". See tests/systemd/README.md.
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
#   E2E_MIRROR   the Debian mirror for debootstrap (default: the one apt uses)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
ROOTFS=$(realpath -m "${E2E_ROOTFS:-target/e2e-rootfs}")
PKGDIR=$(realpath -m "${E2E_PKGDIR:-target/packages}")
PAGE=$REPO/docs/INSTALL.md
CHAT_BODY='{"model":"m","messages":[{"role":"user","content":"hi"}]'
SUITE=bookworm
RELAY=relay.example.com
# libpam-systemd and dbus-user-session: a login (pam_systemd) gets
# XDG_RUNTIME_DIR and a user manager with its bus, as on a desktop; sudo:
# the page's lines run as written.
INCLUDE=systemd,systemd-sysv,dbus,procps,iproute2,curl,ca-certificates,openssl,libpam-systemd,dbus-user-session,sudo

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
    local cmd="rm -f /root/slow.*; curl -sS -N --fail-with-body https://$RELAY/api/tunnel/alice/api/chat -H \"Authorization: Bearer \$(cat /home/admin/alice.token)\" -d '$CHAT_BODY,\"options\":{\"num_predict\":$1,\"token_delay_ms\":$2}}' > /root/slow.out 2> /root/slow.err; echo \$? > /root/slow.rc"
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


# ------------------------------------------------------------ the page

# The page's command blocks: a marker line `<!-- e2e: NAME -->` right
# before a ```sh block, or `<!-- e2e: not run: REASON -->`.
declare -A PAGE_RAN=()

# page_blocks: "NAME" for every marked block, "-" for one marked not run,
# "?" for a ```sh block without a marker, one per line, in page order.
page_blocks() {
    awk '
        /^```sh$/ {
            if (prev ~ /^<!-- e2e: not run: .+ -->$/) print "-"
            else if (prev ~ /^<!-- e2e: [a-z0-9-]+ -->$/) { n = prev; sub(/^<!-- e2e: /, "", n); sub(/ -->$/, "", n); print n }
            else print "?"
        }
        { prev = $0 }' "$PAGE"
}

# page_text NAME: the lines of block NAME.
page_text() {
    awk -v m="<!-- e2e: $1 -->" '
        $0 == m { found = 1; next }
        found == 1 && /^```sh$/ { inblock = 1; found = 2; next }
        found == 1 { exit }
        inblock && /^```$/ { exit }
        inblock { print }' "$PAGE"
}

# page [-u USER] NAME [FROM=TO ...]: runs block NAME of docs/INSTALL.md,
# each command as written (a line ending in \ goes on with the next), in
# one login shell of USER (default admin; `runuser -l`, a PAM session as a
# login would have: pam_systemd gives XDG_RUNTIME_DIR and the user
# manager), in his home. FROM=TO replaces the text FROM (the page's
# examples; each must occur). Every command must exit 0. $OUT is the
# transcript; page_out NAME N is the output of its Nth command (from 1).
page() {
    local user=admin
    if [ "$1" = "-u" ]; then user=$2; shift 2; fi
    local name=$1; shift
    local text sub from to
    text=$(page_text "$name")
    [ -n "$text" ] || fail "docs/INSTALL.md has no block marked <!-- e2e: $name -->"
    for sub in "$@"; do
        from=${sub%%=*}; to=${sub#*=}
        grep -qF -- "$from" <<<"$text" || fail "block $name: no '$from' to replace"
        text=${text//"$from"/"$to"}
    done
    # One script: each command printed, run in this shell (umask, cd and
    # variables carry over, as when typed), its output kept and shown.
    local script="set -o pipefail
d=/tmp/e2e-page; cd || exit 1
" cmd= line n=0
    while IFS= read -r line || [ -n "$line" ]; do
        cmd+=$line
        if [[ $cmd == *\\ ]]; then cmd=${cmd%\\}; continue; fi
        [[ $cmd =~ ^[[:space:]]*$ ]] && { cmd=; continue; }
        n=$((n + 1))
        script+="printf '%s\$ %s\n' $(printf %q "$user") $(printf %q "$cmd")
{ $cmd
} > \$d/$name.$n.out 2>&1 < /dev/null; rc=\$?
cat \$d/$name.$n.out
if [ \$rc -ne 0 ]; then echo \"(exit \$rc)\"; exit 100; fi
"
        cmd=
    done <<<"$text"
    say "---- docs/INSTALL.md, block \"$name\" (as $user, $n command(s))"
    ct "mkdir -p -m 1777 /tmp/e2e-page && cat > /tmp/e2e-page/$name.sh" <<<"$script"
    local rc=0
    OUT=$(ct "runuser -l $user -c 'bash /tmp/e2e-page/$name.sh'" 2>&1) || rc=$?
    [ -z "$OUT" ] || say "$OUT"
    [ "$rc" -eq 0 ] || fail "docs/INSTALL.md, block \"$name\": a command failed (see above)"
    PAGE_RAN[$name]=1
}

page_out() {
    ct "cat /tmp/e2e-page/$1.$2.out"
}

# ------------------------------------------------------------ not the page

# fixture WHAT CMD: what the page assumes of the world, made here (as root).
fixture() {
    say "# fixture: $1"
    run "$2"
}

# experiment WHAT: a test beyond the page begins (its commands run as root).
experiment() {
    say ""
    say "# experiment (beyond docs/INSTALL.md): $1"
}

# check [-e CODE] [-t N] CMD: like run, for reading only: the command must
# start with one of these (so the test does no step the page does not show).
CHECK_VERBS='systemctl show |systemctl status |systemctl is-active |systemctl is-enabled |systemctl is-failed |systemctl list-units |journalctl |tunnelctl status|tunnelctl --daemon agentd status|tunnelctl --daemon relayd status|tunnelctl tunnels|tunnelctl --daemon relayd tunnels|runuser -u [a-z]+ -- tunnelctl |curl |stat |ls |cat |grep |getent |id |ss |pgrep |dpkg-query |md5sum |find |tail |openssl |cut |echo |n=|out=|left=|state='
check() {
    local a=() cmd
    while [ "${1:-}" = -e ] || [ "${1:-}" = -t ]; do a+=("$1" "$2"); shift 2; done
    cmd=$1
    grep -Eq "^($CHECK_VERBS)" <<<"$cmd" || fail "check: '$cmd' is not a read-only command the test may run between the page's blocks"
    run "${a[@]}" "$cmd"
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

# DEB[p]: the newest file of package p (cargo-deb names NAME_VERSION_ARCH.deb).
declare -A DEB
for p in relayd agentd tunnelctl; do
    f=$(ls -t "$PKGDIR"/"${p}"_*_*.deb 2>/dev/null | head -n1 || true)
    [ -n "$f" ] || fail "no ${p}_*.deb in $PKGDIR (build the packages first: bash packaging/build.sh)"
    DEB[$p]=$(basename "$f")
done
host "ls -l $PKGDIR"
# The page names the files of this version: they must be what was built.
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
for p in relayd agentd tunnelctl; do
    [ "${DEB[$p]}" = "${p}_${VERSION}-1_amd64.deb" ] || fail "${DEB[$p]}: the page installs ${p}_${VERSION}-1_amd64.deb"
done

# Every ```sh block of the page is marked: a name the test runs, or not run.
blocks=$(page_blocks)
if grep -qx '?' <<<"$blocks"; then fail "docs/INSTALL.md: a \`\`\`sh block without an <!-- e2e: ... --> marker"; fi
dups=$(grep -vx -- - <<<"$blocks" | sort | uniq -d)
[ -z "$dups" ] || fail "docs/INSTALL.md: block names used twice: $dups"
say "docs/INSTALL.md: $(grep -vcx -- - <<<"$blocks") blocks to run ($(grep -vx -- - <<<"$blocks" | tr '\n' ' ')), $(grep -cx -- - <<<"$blocks") marked not run"

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
    [ -n "$MIRROR" ] || fail "no Debian mirror in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list: set E2E_MIRROR to one"
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
for f in usr/bin/curl usr/bin/openssl usr/bin/systemctl usr/sbin/useradd usr/bin/pgrep usr/bin/loginctl usr/bin/sudo; do
    [ -e "$ROOTFS/$f" ] || fail "$ROOTFS lacks /$f: delete it to have it made again with --include=$INCLUDE"
done

EPHEMERAL_BEFORE=$(echo "$(dirname "$ROOTFS")"/.#machine."$(basename "$ROOTFS")"*)
NSPAWN_LOG=$(mktemp /tmp/e2e-nspawn.XXXXXX)
BINDS=(--bind-ro="$STANDIN":/usr/local/bin/stand-in-ollama --bind-ro="$PKGDIR":/mnt/pkg)
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

# ------------------------------------------------------------------ steps

section "1. the world the page assumes (fixtures)"
fixture "relay.example.com is this machine (its DNS name)" \
    "printf '127.0.0.1\tlocalhost $RELAY\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t%s\n' \"\$(hostname)\" > /etc/hosts; getent hosts $RELAY"
fixture "a certificate for relay.example.com from a CA this machine trusts, as a public CA's would be (and its renewal, for later)" \
    "set -e; mkdir -p /root/pki; cd /root/pki
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \\
    -keyout ca.key -out ca.pem -subj '/CN=tunnel e2e test CA' \\
    -addext 'basicConstraints=critical,CA:TRUE' -addext 'keyUsage=critical,keyCertSign,cRLSign' 2>/dev/null
printf 'subjectAltName=DNS:$RELAY\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' > leaf.ext
for n in 1 2; do
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout leaf\$n.key -subj /CN=$RELAY -out leaf\$n.csr 2>/dev/null
    openssl x509 -req -in leaf\$n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile leaf.ext -out leaf\$n.pem 2>/dev/null
done
install -m 0644 ca.pem /usr/local/share/ca-certificates/tunnel-e2e-test-ca.crt
update-ca-certificates 2>&1 | tail -n 1
openssl verify leaf1.pem leaf2.pem"
expect "the certificates verify against the system's trusted roots" 'leaf2.pem: OK'
fixture "admin: the administrator, who may use sudo and read the system journal (group adm); the package files and the certificate in his home" \
    "set -e
useradd -m -s /bin/bash -G adm admin
useradd -m -s /bin/bash dave
useradd -m -s /bin/bash carol
printf 'admin ALL=(ALL) NOPASSWD: ALL\ndave ALL=(ALL) NOPASSWD: ALL\n' > /etc/sudoers.d/e2e; chmod 0440 /etc/sudoers.d/e2e
cd /home/admin
cp /mnt/pkg/${DEB[relayd]} /mnt/pkg/${DEB[agentd]} /mnt/pkg/${DEB[tunnelctl]} .
install -m 0644 /root/pki/leaf1.pem fullchain.pem
install -m 0600 /root/pki/leaf1.key privkey.pem
chown admin:admin *.deb fullchain.pem privkey.pem
ls -l /home/admin; id admin; id dave; id carol"
fixture "Ollama on the desktop (a stand-in), on 127.0.0.1:11434" \
    'systemd-run --unit=ollama /usr/local/bin/stand-in-ollama --listen 127.0.0.1:11434'
wait_until "the stand-in Ollama answers" 15 'curl -sS --max-time 2 http://127.0.0.1:11434/api/version'

section "2. docs/INSTALL.md, The relay: install, certificate, start, tokens"
page relay-install
check 'dpkg-query -W -f='"'"'${Package} ${Version} ${Status} conffiles:${Conffiles}\n'"'"' relayd tunnelctl'
expect "relayd installed" '^relayd .* install ok installed'
expect "tunnelctl installed" '^tunnelctl .* install ok installed'
expect "relayd.toml is a conffile" '/etc/relayd/relayd.toml'
check 'getent passwd relayd; stat -c "%A %U:%G %n" /etc/relayd'
expect "sysusers created user relayd" '^relayd:x:[0-9]+:[0-9]+:'
expect "/etc/relayd is 0750 root:relayd (tmpfiles.d)" '^drwxr-x--- root:relayd /etc/relayd$'
check 'systemctl is-active relayd.socket relayd || true; systemctl is-enabled relayd.socket relayd || true'
expect "relayd.socket and relayd neither active nor enabled after install" '^inactive
inactive
disabled
disabled$'
check 'ss -Hltn "sport = :443" | wc -l'
expect "nothing listens on 443 yet" '^0$'
page relay-tls
expect "relayd's check of the configuration, as user relayd" '^relayd.toml: ok$'
check 'grep -E "^(cert_file|key_file) = " /etc/relayd/relayd.toml; stat -c "%a %U:%G %n" /etc/relayd/tls /etc/relayd/tls/*'
expect "the [tls] lines are in force" '^key_file = "/etc/relayd/tls/privkey.pem"$'
expect "the key is relayd's, 0600" '^600 relayd:relayd /etc/relayd/tls/privkey.pem$'
page relay-start
expect "systemctl status relayd: relayd's own status line" 'Status: "serving 0 tunnels, 0 streams in flight"'
expect "tunnelctl --daemon relayd status: serving" '^relayd [0-9.]+: serving$'
expect "relayd serves TLS on the inherited socket" 'tls +/etc/relayd/tls/fullchain.pem'
check 'systemctl status relayd.socket'
expect "the socket unit listens on 443" 'Listen: .*:443'
check 'stat -c "%a %U:%G %n" /var/lib/relayd/signing.key'
expect "relayd made its signing key in its state directory on its first start" '^600 relayd:relayd /var/lib/relayd/signing.key$'
page relay-tokens
expect "an agent credential for alice" 'tunnelctl: agent credential c_[0-9a-f]+ for alice$'
expect "a client token for alice" 'tunnelctl: client token t_[0-9a-f]+ for alice, valid until '
check 'stat -c "%a %U %s bytes %n" /home/admin/alice.credential /home/admin/alice.token; cut -c1-8 /home/admin/alice.credential'
expect "the credential file is the admin's only" '^600 admin [0-9]+ bytes /home/admin/alice.credential$'
expect "the token file too" '^600 admin [0-9]+ bytes /home/admin/alice.token$'
expect "the credential has the tcred_ shape" '^tcred_c_'

section "3. docs/INSTALL.md, The desktop: install (agentd starts, not enrolled), enroll"
page desktop-install
expect "systemctl status agentd: it says how to enroll" 'Status: "not enrolled: run tunnelctl enroll wss://RELAY \(credential on stdin\)"'
expect "sudo tunnelctl status: a running agent, not enrolled" '^agentd [0-9.]+: not enrolled$'
check 'dpkg-query -W -f='"'"'${Package} ${Status} conffiles:${Conffiles}\n'"'"' agentd; getent passwd agentd; stat -c "%A %U:%G %n" /etc/agentd'
expect "agentd installed, agentd.toml a conffile" '^agentd install ok installed conffiles:.*/etc/agentd/agentd.toml'
expect "/etc/agentd is 0750 root:agentd (tmpfiles.d)" '^drwxr-x--- root:agentd /etc/agentd$'
check 'systemctl is-active agentd; systemctl is-enabled agentd'
expect "the package enabled and started agentd (Debian's convention)" '^active
enabled$'
page desktop-enroll
expect "enrolled and connected" '^enrolled with wss://relay.example.com/ws/tunnel \(stored in /var/lib/agentd\); connected$'
wait_until "agentd's Status line says connected" 20 \
    'systemctl show -p StatusText --value agentd | grep "^connected to relay.example.com"'
check 'systemctl status agentd'
expect "systemctl status agentd: connected" 'Status: "connected to relay.example.com, 0 streams'
check 'cat /var/lib/agentd/enrollment.toml; tunnelctl tunnels'
expect "the enrollment is stored" 'relay = "wss://relay.example.com/ws/tunnel"'
expect "relayd lists alice's tunnel" '^alice +[^ ]+ +s_[0-9a-f]+ '

section "4. docs/INSTALL.md, The first answer: a streamed chat with the client token, through the relay"
page first-answer
OUT=$(page_out first-answer 1)
lines=$(grep -c '^{' <<<"$OUT" || true)
[ "$lines" -ge 3 ] || fail "expected a streamed NDJSON answer (several lines), got $lines"
[ "$(grep -c '"done":false' <<<"$OUT")" -eq $((lines - 1)) ] || fail "expected every line but the last to be a token line"
tail -n1 <<<"$OUT" | grep -q '"done":true' || fail "the last line is not the done line"
ok "the answer: $lines NDJSON lines, tokens then done"
OUT=$(page_out first-answer 2)
expect "the health answer: alice's agent is connected" '"connected":true'
check "curl -sS -N -o /dev/null -D - https://$RELAY/api/tunnel/alice/api/chat -H \"Authorization: Bearer \$(cat /home/admin/alice.token)\" -d '$CHAT_BODY}'"
expect "HTTP 200" '^HTTP/1.1 200'
expect "NDJSON, streamed" '^content-type: application/x-ndjson'
check "curl -sS -o /dev/null -w '%{http_code}\n' https://$RELAY/api/tunnel/alice/api/chat -d '$CHAT_BODY}'; curl -sS -o /dev/null -w '%{http_code}\n' https://$RELAY/api/tunnel/alice/health"
expect "without the token: 401, both" '^401
401$'

section "5. who may use the control socket: the page's group, and others"
page desktop-group
page desktop-status
expect "admin, in group agentd after a new login: tunnelctl status without sudo" '^agentd [0-9.]+: connected$'
check 'id admin'
expect "admin is in group agentd" '^uid=[0-9]+\(admin\).*[0-9]+\(agentd\)'
check -e 77 'runuser -u admin -- tunnelctl reconnect'
expect "a member may not change agentd" 'permission denied'
check -e 77 'runuser -u carol -- tunnelctl --daemon agentd status'
expect "carol (not in group agentd) is refused" 'permission denied.*group agentd'
check -e 77 'runuser -u carol -- tunnelctl status'
expect "carol without --daemon: refused too (not \"not running\")" 'permission denied'

section "6. docs/INSTALL.md, An agent of your own: dave's user unit"
page dave-credential
expect "relayd issued dave's credential" 'tunnelctl: agent credential c_[0-9a-f]+ for dave$'
DAVE_CRED=$(grep -o 'credential c_[0-9a-f]*' <<<"$OUT" | cut -d' ' -f2)
fixture "dave gets his credential over a channel the admin trusts" \
    'install -o dave -g dave -m 0600 /home/admin/dave.credential /home/dave/dave.credential'
DAVE_UID=$(ct 'id -u dave')
page -u dave dave-group
page -u dave dave-agent
expect "dave's agentd (user unit), not enrolled" '^agentd [0-9.]+: not enrolled$'
expect "dave enrolled and connected" '^enrolled with wss://relay.example.com/ws/tunnel \(stored in /home/dave/.config/agentd\); connected$'
wait_until "dave's agentd Status line says connected" 20 \
    "$(as_user dave 'systemctl --user show -p StatusText --value agentd | grep "^connected to relay.example.com"')"
check "stat -c '%A %U:%G %n' /run/user/$DAVE_UID/agentd /run/user/$DAVE_UID/agentd/control.sock; ls -A /home/dave/.config/agentd"
expect "his control socket is his only" "^drwx------ dave:dave /run/user/$DAVE_UID/agentd\$"
expect "systemd 252: the user unit's state (StateDirectory=) is ~/.config/agentd" '^enrollment.toml$'
check -e 77 "runuser -u admin -- tunnelctl --socket /run/user/$DAVE_UID/agentd/control.sock status"
expect "admin (group agentd) cannot reach dave's agent" 'permission denied'
check 'tunnelctl tunnels'
expect "relayd lists dave's tunnel" '^dave +[^ ]+ +s_[0-9a-f]+ '
expect "and alice's" '^alice +[^ ]+ +s_[0-9a-f]+ '

section "7. docs/INSTALL.md, Rotating credentials: rotate-token while a slow stream runs"
check 'tunnelctl tunnels'
SESSION=$(awk '$1 == "alice" {print $3}' <<<"$OUT")
AUTH_BEFORE=$(grep '^alice ' <<<"$OUT" | grep -o 'c_[0-9a-f]\{16\}' | head -n1)
[ -n "$SESSION" ] && [ -n "$AUTH_BEFORE" ] || fail "no session or credential id in the answer above"
say "session $SESSION, credential $AUTH_BEFORE"
slow_start 20 250
page rotate
expect "credential rotated" '^credential rotated: now c_[0-9a-f]+, stored in /var/lib/agentd/credential; the old one is revoked$'
AUTH_NEW=$(grep -o 'now c_[0-9a-f]*' <<<"$OUT" | cut -d' ' -f2)
check 'tunnelctl --daemon agentd status | grep -E "in flight|session"; tunnelctl tunnels'
expect "agentd counts the stream in flight" 'in flight +1$'
expect "relayd counts the stream in flight" "^alice +[^ ]+ +$SESSION +.* 1 +"
slow_finish 20 "the rotation"
check 'tunnelctl tunnels'
expect "the same session $SESSION is up" "^alice +[^ ]+ +$SESSION "
expect "now authorized by the new credential $AUTH_NEW" "$AUTH_NEW"
check 'tunnelctl --daemon agentd status'
expect "agentd: same session" "session +$SESSION"
expect "no reconnect" 'sessions +1 \(0 reconnects\)'
check 'cut -c1-24 /var/lib/agentd/credential'
expect "the new credential is stored" "^tcred_$AUTH_NEW"
check 'curl -sS -o /dev/null -w "%{http_code}\n" -H "Authorization: Bearer $(cat /home/admin/alice.credential)" -H "Connection: Upgrade" -H "Upgrade: websocket" -H "Sec-WebSocket-Version: 13" -H "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==" https://relay.example.com/ws/tunnel'
expect "the old credential is refused (401)" '^401$'

section "8. docs/INSTALL.md, Logs: the journal's access lines and fields, tunnelctl log-level"
check "curl -sS -N https://$RELAY/api/tunnel/alice/api/chat -H \"Authorization: Bearer \$(cat /home/admin/alice.token)\" -d '$CHAT_BODY,\"options\":{\"num_predict\":2}}' | tail -n1"
expect "a request" '"done":true'
wait_until "the last line of agentd's journal is its access line" 10 \
    'out=$(journalctl -u agentd -o json -n 1); echo "$out"; grep -q "\"REQUEST_ID\"" <<<"$out"'
REQ=$(sed -n 's/.*"REQUEST_ID":"\([^"]*\)".*/\1/p' <<<"$OUT")
SES=$(sed -n 's/.*"SESSION":"\([^"]*\)".*/\1/p' <<<"$OUT")
[ -n "$REQ" ] && [ -n "$SES" ] || fail "no REQUEST_ID or SESSION in the access line"
page logs "req_2=$REQ"
OUT=$(page_out logs 1)
expect "journalctl -u agentd: the agent's life" 'agentd\[[0-9]+\]: .*connected'
OUT=$(page_out logs 2)
expect "journalctl -u agentd REQUEST_ID=$REQ finds its access line" 'agentd\[[0-9]+\]: '
OUT=$(page_out logs 3)
for f in SESSION REQUEST_ID METHOD PATH STATUS DURATION_MS OUTCOME; do
    expect "journalctl -u agentd -o json-pretty -n 1: field $f" "\"$f\" : \"[^\"]+\""
done
OUT=$(page_out logs 4)
expect "log-level debug: agentd's filter is debug now" '^log filter: debug \(was info; until the next restart\)$'
OUT=$(page_out logs 5)
expect "log-level info: back to info" '^log filter: info \(was debug; until the next restart\)$'
# Stream ids restart with each session: SESSION and REQUEST_ID together name one request.
check "journalctl -u relayd --no-pager -o cat --output-fields=REQUEST_ID,USER_HASH,OUTCOME SESSION=$SES REQUEST_ID=$REQ | tail -n 3"
expect "relayd logged the same request" "^$REQ\$"
expect "relayd names the user by its keyed hash only" '^u_[0-9a-f]{12}$'

section "9. docs/INSTALL.md, When a daemon hangs: the watchdog kills and restarts agentd"
experiment "WatchdogSec=4s for agentd (a drop-in), then agentd stopped with SIGSTOP"
run 'mkdir -p /etc/systemd/system/agentd.service.d && printf "[Service]\nWatchdogSec=4s\n" > /etc/systemd/system/agentd.service.d/50-e2e-watchdog.conf && systemctl daemon-reload && systemctl restart agentd && systemctl show -p WatchdogUSec agentd'
expect "WatchdogSec=4s in force" '^WatchdogUSec=4s$'
wait_until "agentd connected again" 20 'systemctl show -p StatusText --value agentd | grep "^connected to relay.example.com"'
page watchdog
BEFORE_N=$(sed -n 's/^NRestarts=//p' <<<"$OUT")
check 'systemctl show -p MainPID agentd'
BEFORE_PID=$(sed -n 's/^MainPID=//p' <<<"$OUT")
run "kill -STOP $BEFORE_PID; date +%T"
wait_until "systemd killed and restarted agentd" 30 \
    "[ \"\$(systemctl show -p NRestarts --value agentd)\" -gt $BEFORE_N ] && [ \"\$(systemctl show -p ActiveState --value agentd)\" = active ] && date +%T"
page watchdog
AFTER_N=$(sed -n 's/^NRestarts=//p' <<<"$OUT")
check 'systemctl show -p MainPID agentd'
AFTER_PID=$(sed -n 's/^MainPID=//p' <<<"$OUT")
[ "$AFTER_N" -eq $((BEFORE_N + 1)) ] || fail "NRestarts $BEFORE_N -> $AFTER_N, expected +1"
[ "$AFTER_PID" != "$BEFORE_PID" ] && [ "$AFTER_PID" != 0 ] || fail "MainPID $BEFORE_PID -> $AFTER_PID"
ok "NRestarts $BEFORE_N -> $AFTER_N, MainPID $BEFORE_PID -> $AFTER_PID"
check "journalctl -u agentd -o short-precise | grep -E 'Watchdog timeout|status=6/ABRT|result .watchdog.|Scheduled restart'"
expect "the journal says watchdog timeout" 'agentd.service: Watchdog timeout \(limit 4s\)!'
wait_until "agentd connected again with the stored (rotated) credential" 20 \
    'systemctl show -p StatusText --value agentd | grep "^connected to relay.example.com"'
run 'rm -r /etc/systemd/system/agentd.service.d && systemctl daemon-reload'

section "10. docs/INSTALL.md, Reloading: relayd with a renewed certificate (tunnel and stream stay), agentd"
wait_until "relayd lists exactly one tunnel for alice" 20 \
    'out=$(tunnelctl tunnels); echo "$out"; [ "$(grep -c "^alice " <<<"$out")" = 1 ]'
check 'tunnelctl tunnels'
SESSION=$(awk '$1 == "alice" {print $3}' <<<"$OUT")
[ -n "$SESSION" ] || fail "no session id"
check 'systemctl show -p MainPID,NRestarts relayd'
RELAYD_BEFORE=$OUT
FP="openssl s_client -connect $RELAY:443 -servername $RELAY </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
check "$FP"
FP_OLD=$OUT
check 'openssl x509 -in /root/pki/leaf2.pem -noout -fingerprint -sha256'
FP_NEW=$OUT
[ "$FP_OLD" != "$FP_NEW" ] || fail "the renewed certificate has the old fingerprint"
fixture "the CA renewed the certificate: the new files in admin's home" \
    'install -o admin -g admin -m 0644 /root/pki/leaf2.pem /home/admin/fullchain.pem && install -o admin -g admin -m 0600 /root/pki/leaf2.key /home/admin/privkey.pem'
slow_start 12 250
page reload-relay
check 'systemctl show -p ActiveState,SubState,StatusText relayd; journalctl -u relayd --no-pager -o cat | tail -n 3'
expect "relayd active after the reload" '^ActiveState=active$'
expect "relayd logged the reload" 'TLS certificate and key reloaded'
slow_finish 12 "the reload"
check "$FP"
[ "$OUT" = "$FP_NEW" ] || fail "a fresh TLS connection does not see the renewed certificate"
ok "a fresh TLS connection sees the renewed certificate (fingerprint changed)"
check 'systemctl show -p MainPID,NRestarts relayd'
[ "$OUT" = "$RELAYD_BEFORE" ] || fail "relayd restarted instead of reloading"
ok "relayd was not restarted"
check 'tunnelctl tunnels'
expect "the same session $SESSION is still up" "^alice +[^ ]+ +$SESSION "
check 'systemctl show -p MainPID agentd'
AGENTD_PID=$OUT
slow_start 8 250
page reload-agent
check 'systemctl show -p MainPID agentd; systemctl is-active agentd'
[ "$(head -n1 <<<"$OUT")" = "$AGENTD_PID" ] || fail "agentd restarted instead of reloading"
expect "agentd active after the reload, same MainPID" '^active$'
slow_finish 8 "agentd's reload"
check 'tunnelctl --daemon agentd status'
expect "agentd still on session $SESSION after its reload" "session +$SESSION"
expect "no reconnect" 'sessions +1 \(0 reconnects\)'

section "11. docs/INSTALL.md, When relayd cannot start: an unreadable key; the socket stays, the journal says why, one restart brings it back"
experiment "relayd's TLS key made unreadable for relayd (owner root, as when copied by root), relayd restarted, agents and clients knocking meanwhile"
run 'chown root:root /etc/relayd/tls/privkey.pem; stat -c "%a %U:%G %n" /etc/relayd/tls/privkey.pem'
run 'systemctl restart relayd; echo "systemctl restart relayd: exit $?"'
# Agents reconnect on their own (alice's system agent, dave's); web clients
# keep coming: each connection to the socket may start relayd again.
run 'for i in $(seq 1 8); do curl -sS -o /dev/null -w "%{http_code} " --max-time 3 https://relay.example.com/healthz || true; sleep 0.5; done; echo'
run 'sleep 8'
check 'systemctl show -p ActiveState,SubState,Result relayd.socket; systemctl show -p ActiveState,Result,NRestarts relayd'
expect "relayd.socket is still active (not failed)" '^ActiveState=active$'
check 'ss -Hltn "sport = :443" | wc -l'
expect "something still listens on 443 (the socket unit)" '^[1-9]'
check 'journalctl -u relayd -n 30 --no-pager -o cat'
expect "the journal names the key file" '/etc/relayd/tls/privkey.pem'
expect "and says what to do" 'systemctl restart relayd'
check 'systemctl show -p StatusText relayd'
expect "relayd's Status line names the key file too" 'privkey.pem'
run 'chown relayd:relayd /etc/relayd/tls/privkey.pem; stat -c "%a %U:%G %n" /etc/relayd/tls/privkey.pem'
say "# the file is fixed: the page's way back"
page relay-fix
check 'systemctl is-active relayd.socket relayd'
expect "relayd.socket and relayd active after one restart" '^active
active$'
wait_until "agentd connected again" 30 'systemctl show -p StatusText --value agentd | grep "^connected to relay.example.com"'
check "curl -sS -N https://$RELAY/api/tunnel/alice/api/chat -H \"Authorization: Bearer \$(cat /home/admin/alice.token)\" -d '$CHAT_BODY,\"options\":{\"num_predict\":3}}' | tail -n1"
expect "a chat through the relay works again" '"done":true'

section "12. docs/INSTALL.md, Upgrading: the same packages again; the edited configuration, the enrollment and the agents stay"
experiment "the administrator edits /etc/agentd/agentd.toml before the upgrade"
run 'echo "# edited by the administrator before the upgrade" >> /etc/agentd/agentd.toml; tail -n1 /etc/agentd/agentd.toml'
check 'md5sum /etc/agentd/agentd.toml /etc/relayd/relayd.toml /var/lib/agentd/enrollment.toml /var/lib/agentd/credential'
SUMS_BEFORE=$OUT
check 'systemctl show -p MainPID relayd; systemctl show -p MainPID agentd'
PIDS_BEFORE=$OUT
DAVE_PID_BEFORE=$(ct "$(as_user dave 'systemctl --user show -p MainPID agentd')")
say "# No newer version exists here: the same files go in again, which runs the same"
say "# maintainer-script paths as an upgrade (postinst configure with the installed version)."
page upgrade "0.1.1-1=$VERSION-1"
check 'dpkg-query -W -f='"'"'${Package} ${Version} ${Status}\n'"'"' relayd agentd tunnelctl'
expect_not "all three installed" ' (deinstall|half|unpacked|config-files)'
check 'md5sum /etc/agentd/agentd.toml /etc/relayd/relayd.toml /var/lib/agentd/enrollment.toml /var/lib/agentd/credential'
[ "$OUT" = "$SUMS_BEFORE" ] || fail "a configuration file or the enrollment changed in the upgrade"
ok "the edited agentd.toml, relayd.toml, the enrollment and the credential are unchanged"
check 'systemctl is-active relayd.socket relayd agentd'
expect "relayd.socket, relayd, agentd active after the upgrade" '^active
active
active$'
check 'systemctl show -p MainPID relayd; systemctl show -p MainPID agentd'
PIDS_AFTER=$OUT
[ "$(head -n1 <<<"$PIDS_AFTER")" != "$(head -n1 <<<"$PIDS_BEFORE")" ] || fail "relayd was not restarted by the upgrade"
[ "$(tail -n1 <<<"$PIDS_AFTER")" != "$(tail -n1 <<<"$PIDS_BEFORE")" ] || fail "agentd was not restarted by the upgrade"
ok "the packages restarted relayd and agentd (MainPIDs: $(echo $PIDS_BEFORE) -> $(echo $PIDS_AFTER))"
wait_until "agentd connected again, with the stored enrollment" 30 \
    'systemctl show -p StatusText --value agentd | grep "^connected to relay.example.com"'
check "curl -sS -N https://$RELAY/api/tunnel/alice/api/chat -H \"Authorization: Bearer \$(cat /home/admin/alice.token)\" -d '$CHAT_BODY,\"options\":{\"num_predict\":3}}' | tail -n1"
expect "a chat through alice's tunnel after the upgrade" '"done":true'
# A user unit is not the package's to restart.
OUT=$(ct "$(as_user dave 'systemctl --user show -p MainPID agentd')")
[ "$OUT" = "$DAVE_PID_BEFORE" ] || fail "dave's agentd (user unit) was restarted by the package"
ok "dave's agentd (user unit) kept running: $OUT"
page -u dave upgrade-user
wait_until "dave's agentd connected again" 30 \
    "$(as_user dave 'systemctl --user show -p StatusText --value agentd | grep "^connected to relay.example.com"')"

section "13. docs/INSTALL.md, Rotating credentials (revoke) and Removing: nothing of the packages remains"
check 'dpkg-query -L relayd agentd tunnelctl | sort -u | while read -r f; do [ -z "$f" ] || [ -d "$f" ] || echo "$f"; done > /root/package-files; wc -l < /root/package-files'
page revoke "c_ID=$DAVE_CRED"
expect "relayd lists dave's tunnel with its credential" "^dave +[^ ]+ +s_[0-9a-f]+ .*$DAVE_CRED"
expect "dave's credential revoked, his session ended" "^$DAVE_CRED revoked; 1 live session\\(s\\) ended$"
wait_until "relayd no longer lists dave's tunnel" 10 \
    'out=$(tunnelctl tunnels); echo "$out"; ! grep -q "^dave " <<<"$out"'
wait_until "dave's agent says why it is not connected" 10 \
    "$(as_user dave 'out=$(tunnelctl status); echo "$out"; grep -q "credential was revoked" <<<"$out"')"
expect_not "dave's agent is not connected any more" ': connected$'
page -u dave remove-user
OUT=$(ct "$(as_user dave 'systemctl --user is-active agentd')" 2>&1 || true)
[ "$OUT" = inactive ] || fail "dave's agentd: $OUT, expected inactive"
ok "dave's agentd stopped"
page remove-agentd
check 'dpkg-query -W -f='"'"'${Package} ${Status}\n'"'"' agentd; ls /etc/agentd /var/lib/agentd; tail -n1 /etc/agentd/agentd.toml'
expect "agentd: removed, its configuration kept" '^agentd deinstall ok config-files$'
expect "with the administrator's edit" '^# edited by the administrator before the upgrade$'
expect "/var/lib/agentd stays (the enrollment)" '^enrollment.toml$'
check 'ls /usr/bin/agentd /usr/lib/systemd/system/agentd.service /usr/lib/systemd/user/agentd.service 2>&1 || true'
expect_not "the binary and the units are gone" '^/usr/'
page purge-agentd
check 'ls -d /etc/agentd /var/lib/agentd 2>&1 || true'
expect "/etc/agentd gone (nothing was added there)" "cannot access '/etc/agentd'"
expect "/var/lib/agentd gone" "cannot access '/var/lib/agentd'"
page purge-relayd
OUT=$(page_out purge-relayd 2)
expect "the purge says what it kept" '^relayd: purge kept /etc/relayd: it holds files the package did not install:$'
expect "the certificate, by name" '^  /etc/relayd/tls/fullchain.pem$'
expect "the key, by name" '^  /etc/relayd/tls/privkey.pem$'
expect_not "not relayd.toml (the package's conffile, purged)" 'relayd.toml'
check 'dpkg-query -W -f='"'"'${Package} ${Status}\n'"'"' relayd agentd tunnelctl 2>&1 || true'
expect_not "dpkg knows none of the three any more (not even config-files)" ' (install|deinstall|purge) ok '
check 'left=0; while read -r f; do if [ -e "$f" ] || [ -L "$f" ]; then echo "LEFT: $f"; left=1; fi; done < /root/package-files; echo "checked $(wc -l < /root/package-files) packaged files"; exit $left'
CHECK_PATHS='/usr/bin/relayd /usr/bin/agentd /usr/bin/tunnelctl /usr/lib/systemd/system/relayd.service /usr/lib/systemd/system/relayd.socket /usr/lib/systemd/system/agentd.service /usr/lib/systemd/user/agentd.service /usr/lib/sysusers.d/agentd.conf /usr/lib/sysusers.d/relayd.conf /usr/lib/tmpfiles.d/agentd.conf /usr/lib/tmpfiles.d/relayd.conf /etc/agentd /etc/relayd /var/lib/agentd /var/lib/relayd /run/agentd /run/relayd'
check 'left=0; for f in '"$CHECK_PATHS"'; do if [ -e "$f" ] || [ -L "$f" ]; then echo "LEFT: $f"; left=1; else echo "gone: $f"; fi; done; exit $left'
ok "binaries, units, sysusers/tmpfiles entries, configuration, state and runtime directories are gone"
check 'find /etc/systemd /usr/lib/systemd /var/lib/systemd /usr/share/man /usr/share/doc /usr/share/bash-completion /usr/share/zsh /usr/share/fish \( -name "*relayd*" -o -name "*agentd*" -o -name "*tunnelctl*" \) 2>/dev/null | sed "s/^/LEFT: /"; echo "searched /etc/systemd /usr/lib/systemd /var/lib/systemd (deb-systemd-helper state) /usr/share/{man,doc,bash-completion,zsh,fish}"'
expect_not "no unit, enablement symlink, mask, helper state, man page, doc or completion left" 'LEFT:'
check 'systemctl is-active relayd.socket relayd agentd || true; pgrep -a -x "relayd|agentd" || echo "no relayd or agentd process"; ss -Hltn "sport = :443" | wc -l'
expect_not "no unit active" '^(active|activating)$'
expect "no daemon process" 'no relayd or agentd process'
check 'systemctl list-units --all --no-legend "relayd*" "agentd*" | grep -v "not-found" || true'
expect_not "systemd knows no relayd/agentd unit" '(relayd|agentd)\.(service|socket) +loaded'
check 'getent passwd relayd agentd || true'
say "(the system users stay after a purge, as Debian does for system users)"
check 'ls /home/dave/.config/agentd'
expect "dave's own configuration and enrollment stay (no package touches them)" '^enrollment.toml$'

section "14. .rpm: inspection on the host, not an install"
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

section "15. docs/INSTALL.md: every block run"
missing=()
for b in $(page_blocks | grep -vx -- -); do
    [ -n "${PAGE_RAN[$b]:-}" ] || missing+=("$b")
done
[ ${#missing[@]} -eq 0 ] || fail "blocks of docs/INSTALL.md the test did not run: ${missing[*]}"
ok "all $(page_blocks | grep -vcx -- -) marked blocks of docs/INSTALL.md ran; $(page_blocks | grep -cx -- -) are marked not run, each with its reason"
section "done"
