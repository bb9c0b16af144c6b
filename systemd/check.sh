#!/usr/bin/env bash
# Gates the systemd units without installing them (no systemd as PID 1
# needed, no build):
#   1. `systemd-analyze verify` on a copy of every unit in systemd/ and
#      systemd/user/ whose Exec*= binaries point at /bin/true (verify refuses
#      binaries that do not exist). verify exits 0 even on unknown keys or
#      unparseable values, so ANY output fails the check.
#   2. `systemd-analyze security --offline=true` for relayd.service and
#      agentd.service: the overall exposure must be at most 1.2
#      (--threshold=12: the threshold is on a 0-100 scale, the score on 0-10).
#   3. The sysusers.d and tmpfiles.d files applied to an empty root (root only).
# Every command is printed with its answer, for CI logs.
# Usage: systemd/check.sh   (from anywhere; Debian 12 / systemd 252 or newer)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
packaging=$here/../packaging
max_exposure=12 # 1.2 on systemd-analyze's 0-10 scale

# The last command's combined output and exit code (see run).
out=''
rc=0

# Prints a command, runs it, prints its output and exit code; leaves them in
# $out and $rc. Never fails by itself: callers decide what counts as failure.
run() {
    printf '\n$'
    printf ' %q' "$@"
    printf '\n'
    if out=$("$@" 2>&1); then rc=0; else rc=$?; fi
    if [[ -n $out ]]; then printf '%s\n' "$out"; fi
    printf '[exit %d]\n' "$rc"
}

failures=()
fail() {
    failures+=("$1")
    printf 'FAIL: %s\n' "$1"
}

if ! command -v systemd-analyze >/dev/null; then
    echo "systemd-analyze is missing: installing systemd"
    run apt-get update
    [[ $rc -eq 0 ]] || { echo "apt-get update failed"; exit 1; }
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd
    [[ $rc -eq 0 ]] || { echo "installing systemd failed"; exit 1; }
fi
run systemd-analyze --version

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Copies of the units with every Exec*= binary replaced by /bin/true; the
# arguments and the prefixes (-, @, +, !, :) stay, so the lines still parse
# as written. /usr/bin/relayd etc. and /bin/kill (procps) need not exist.
copy_units() {
    local from=$1 to=$2 f
    mkdir -p "$to"
    for f in "$from"/*.service "$from"/*.socket; do
        [[ -e $f ]] || continue
        sed -E 's#^(Exec[A-Za-z]+=[-@+!:]*)[^[:space:]]+#\1/bin/true#' "$f" >"$to/$(basename "$f")"
    done
}
copy_units "$here" "$work/system"
copy_units "$here/user" "$work/user"

echo
echo "== verify (any output is a failure)"
for unit in "$work"/system/*; do
    run systemd-analyze verify --man=no "$unit"
    [[ $rc -eq 0 && -z $out ]] || fail "verify $(basename "$unit")"
done
# A user manager needs $XDG_RUNTIME_DIR, which root in CI does not have
# ("Failed to lookup RuntimeDirectory path: No such device or address"):
# --user verify gets a private, empty one.
mkdir -m 0700 "$work/xdg-runtime"
for unit in "$work"/user/*; do
    run env XDG_RUNTIME_DIR="$work/xdg-runtime" systemd-analyze --user verify --man=no "$unit"
    [[ $rc -eq 0 && -z $out ]] || fail "verify --user user/$(basename "$unit")"
done

echo
echo "== security (overall exposure at most 1.2)"
for unit in relayd.service agentd.service; do
    run systemd-analyze security --offline=true --threshold="$max_exposure" --no-pager "$here/$unit"
    line=$(grep -F 'Overall exposure level' <<<"$out" || true)
    line=${line#*→ }
    printf '=> %s\n' "${line:-no overall exposure line for $unit}"
    [[ $rc -eq 0 && -n $line ]] || fail "security $unit (exposure above 1.2, or no score)"
done

echo
echo "== sysusers.d and tmpfiles.d on an empty root"
if [[ $EUID -eq 0 ]]; then
    root=$work/root
    mkdir -p "$root/etc" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d"
    cp "$packaging"/sysusers.d/*.conf "$root/usr/lib/sysusers.d/"
    cp "$packaging"/tmpfiles.d/*.conf "$root/usr/lib/tmpfiles.d/"
    run systemd-sysusers --root="$root"
    [[ $rc -eq 0 ]] || fail "systemd-sysusers"
    for user in agentd relayd; do
        if ! grep -q "^$user:" "$root/etc/passwd" || ! grep -q "^$user:" "$root/etc/group"; then
            fail "sysusers.d did not create user and group $user"
        fi
    done
    run systemd-tmpfiles --root="$root" --create
    [[ $rc -eq 0 && -z $out ]] || fail "systemd-tmpfiles"
    # Numeric owners: the names would come from this host's databases.
    run stat -c '%n %a %u:%g' "$root/etc/agentd" "$root/etc/relayd"
    for d in agentd relayd; do
        gid=$(awk -F: -v g="$d" '$1 == g { print $3 }' "$root/etc/group")
        [[ $(stat -c '%a %u %g' "$root/etc/$d" 2>/dev/null) == "750 0 $gid" ]] || fail "/etc/$d is not 0750 root:$d"
    done
else
    echo "skipped: systemd-sysusers/-tmpfiles --root need root"
fi

echo
if ((${#failures[@]})); then
    printf 'check.sh: %d failure(s):\n' "${#failures[@]}"
    printf '  %s\n' "${failures[@]}"
    exit 1
fi
echo "check.sh: all units pass"
