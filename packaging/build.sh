#!/usr/bin/env bash
# Builds the relayd, agentd and tunnelctl packages: .deb (cargo-deb) and
# .rpm (cargo-generate-rpm), all copied to target/packages/.
#
#   bash packaging/build.sh        # then: bash packaging/lint.sh
#
# One release build of the three binaries; the man pages and tunnelctl's
# completions are generated from those binaries into target/packaging/,
# which the package metadata in {relayd,agentd,tunnelctl}/Cargo.toml lists.
# Every command is printed before it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
export CARGO_INCREMENTAL=0

run() {
    printf '+ %s\n' "$*" >&2
    "$@"
}

packages=(relayd agentd tunnelctl)
target=${CARGO_TARGET_DIR:-target}
gen=target/packaging    # generated assets (paths fixed in the Cargo.toml metadata)
out=target/packages

# Timestamps inside the packages: the last commit's, so two builds of one
# commit give the same files (cargo-deb and cargo-generate-rpm read it).
if [ -z "${SOURCE_DATE_EPOCH:-}" ] && git rev-parse --git-dir >/dev/null 2>&1; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct)
    export SOURCE_DATE_EPOCH
fi

# The packaging tools, only when missing.
if ! cargo deb --version >/dev/null 2>&1; then
    run cargo install --locked cargo-deb --version 3.8.0
fi
if ! cargo generate-rpm --version >/dev/null 2>&1; then
    run cargo install --locked cargo-generate-rpm --version 0.21.1
fi
# cargo-deb's $auto dependencies come from dpkg-shlibdeps.
if ! command -v dpkg-shlibdeps >/dev/null; then
    run apt-get install -y --no-install-recommends dpkg-dev
fi

run cargo build --release --locked -p relayd -p agentd -p tunnelctl

run rm -rf "$gen"
run mkdir -p "$gen/man" "$gen/completions" "$gen/bin"
for p in relayd agentd; do
    printf '+ %s man | gzip -9n > %s\n' "$target/release/$p" "$gen/man/$p.8.gz" >&2
    "$target/release/$p" man | gzip -9n >"$gen/man/$p.8.gz"
done
printf '+ %s man | gzip -9n > %s\n' "$target/release/tunnelctl" "$gen/man/tunnelctl.1.gz" >&2
"$target/release/tunnelctl" man | gzip -9n >"$gen/man/tunnelctl.1.gz"
for shell in bash zsh fish; do
    case $shell in
    bash) file=tunnelctl.bash ;;
    zsh) file=_tunnelctl ;;
    fish) file=tunnelctl.fish ;;
    esac
    printf '+ %s completions %s > %s\n' "$target/release/tunnelctl" "$shell" "$gen/completions/$file" >&2
    "$target/release/tunnelctl" completions "$shell" >"$gen/completions/$file"
done
# cargo-generate-rpm packages binaries as they are; the release profile
# keeps line tables (debug = "line-tables-only"), so the .rpm gets stripped
# copies. cargo-deb strips its own copy (--strip below).
for p in "${packages[@]}"; do
    run strip --strip-unneeded -o "$gen/bin/$p" "$target/release/$p"
done

run rm -rf "$out"
run mkdir -p "$out"
for p in "${packages[@]}"; do
    run cargo deb -p "$p" --no-build --strip
    run cargo generate-rpm -p "$p"
done
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
for p in "${packages[@]}"; do
    run cp "$target/debian/${p}_${version}-1_$(dpkg --print-architecture).deb" "$out/"
    run cp "$target/generate-rpm/$p-$version-1.$(uname -m).rpm" "$out/"
done
run ls -l "$out"
