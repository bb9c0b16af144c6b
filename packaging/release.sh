#!/usr/bin/env bash
# The release source archive and the Homebrew formula that installs from it:
#
#   bash packaging/release.sh [--ref REF] [--out DIR]
#
#   DIR/llm-tunnel-VERSION.tar.gz          `git archive` of REF (default HEAD),
#                                          every file under llm-tunnel-VERSION/
#   DIR/llm-tunnel-VERSION.tar.gz.sha256   its checksum (sha256sum format)
#   DIR/llm-tunnel.rb                      packaging/homebrew/llm-tunnel.rb of REF
#                                          with the url and sha256 filled in:
#                                          the formula to publish in the tap
#
# DIR defaults to target/dist. VERSION is [workspace.package] version in the
# Cargo.toml of REF. The url is RELEASE_URL_BASE/vVERSION/llm-tunnel-VERSION.tar.gz
# (RELEASE_URL_BASE defaults to the project's placeholder host), so the
# archive must be uploaded there under that name. The archive holds only what
# is committed at REF (uncommitted changes are not in it) and is the same
# bytes for the same commit: git archive takes every file's time from the
# commit, and gzip -n stores no name or time.
#
# packaging/homebrew/formula-test.rb then proves the archive builds and
# passes the formula's own `test do` (packaging/lint.sh runs both).
set -euo pipefail
cd "$(dirname "$0")/.."

ref=HEAD
out=target/dist
while [ $# -gt 0 ]; do
    case $1 in
    --ref) ref=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: packaging/release.sh [--ref REF] [--out DIR]" >&2; exit 64 ;;
    esac
done
url_base=${RELEASE_URL_BASE:-https://example.invalid/llm-tunnel/releases/download}
template_path=packaging/homebrew/llm-tunnel.rb

run() {
    printf '+ %s\n' "$*" >&2
    "$@"
}

commit=$(git rev-parse --verify "$ref^{commit}")
version=$(git show "$commit:Cargo.toml" | awk '
    /^\[/ { section = $0 }
    section == "[workspace.package]" && $1 == "version" { gsub(/"/, "", $3); print $3; exit }')
[ -n "$version" ] || { echo "release.sh: no [workspace.package] version in $ref:Cargo.toml" >&2; exit 1; }
name=llm-tunnel-$version
# The formula template of the same commit.
template=$(git show "$commit:$template_path")
archive=$out/$name.tar.gz

# The template must carry each placeholder exactly once, on its own line.
grep -cx '  url ".*@VERSION@.*"' <<<"$template" | grep -qx 1 || { echo "release.sh: $ref:$template_path: no single url line with @VERSION@" >&2; exit 1; }
grep -cx '  sha256 "@SHA256@"' <<<"$template" | grep -qx 1 || { echo "release.sh: $ref:$template_path: no single sha256 \"@SHA256@\" line" >&2; exit 1; }

run mkdir -p "$out"
run rm -f "$out"/llm-tunnel-*.tar.gz "$out"/llm-tunnel-*.tar.gz.sha256 "$out/llm-tunnel.rb"
printf '+ git archive --format=tar --prefix=%s/ %s | gzip -9n > %s\n' "$name" "$commit" "$archive" >&2
git archive --format=tar --prefix="$name/" "$commit" | gzip -9n >"$archive.tmp"
mv "$archive.tmp" "$archive"
sha=$(sha256sum "$archive" | cut -d' ' -f1)
(cd "$out" && sha256sum "$name.tar.gz") >"$archive.sha256"

url="$url_base/v$version/$name.tar.gz"
sed -e "s|^  url \".*@VERSION@.*\"\$|  url \"$url\"|" \
    -e "s|^  sha256 \"@SHA256@\"\$|  sha256 \"$sha\"|" \
    <<<"$template" >"$out/llm-tunnel.rb"
if grep -v '^ *#' "$out/llm-tunnel.rb" | grep -q '@VERSION@\|@SHA256@'; then
    echo "release.sh: placeholders left in $out/llm-tunnel.rb" >&2
    exit 1
fi

echo "release $version from $(git rev-parse --short "$commit"):" >&2
echo "  $archive ($(stat -c %s "$archive") bytes, $(tar -tzf "$archive" | wc -l) entries)" >&2
echo "  sha256 $sha" >&2
echo "  $out/llm-tunnel.rb: url $url" >&2
