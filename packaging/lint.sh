#!/usr/bin/env bash
# The packaging gates, after packaging/build.sh:
#   - every .deb in target/packages: inspected (dpkg-deb -I/-c), its layout
#     checked, then `lintian --fail-on error,warning` (overrides, each with
#     its reason: packaging/lintian/NAME);
#   - every .rpm: inspected (rpm -qpi/-qpl/--scripts/--requires), its
#     layout checked, then `rpmlint --strict` with packaging/rpmlint.toml
#     (each filter with its reason);
#   - the Homebrew formula: `ruby -c`; the launchd plist: python3 plistlib.
# Every command is printed before it runs, with its output.
set -euo pipefail
cd "$(dirname "$0")/.."

run() {
    printf '+ %s\n' "$*" >&2
    "$@"
}

fail() {
    printf 'FAIL: %s\n' "$*" >&2
    exit 1
}

missing=()
command -v lintian >/dev/null || missing+=(lintian)
command -v rpm >/dev/null || missing+=(rpm)
command -v rpmlint >/dev/null || missing+=(rpmlint)
command -v ruby >/dev/null || missing+=(ruby)
if [ ${#missing[@]} -gt 0 ]; then
    run apt-get install -y --no-install-recommends "${missing[@]}"
fi

out=target/packages
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)

# What each package must install (the nspawn end-to-end test relies on it).
expect_common() {
    local p=$1
    printf '%s\n' "usr/bin/$p" "usr/share/doc/$p/copyright"
}
expect_deb() {
    local p=$1
    expect_common "$p"
    echo "usr/share/doc/$p/changelog.Debian.gz"
    case $p in
    relayd | agentd)
        printf '%s\n' "usr/lib/sysusers.d/$p.conf" "usr/lib/tmpfiles.d/$p.conf" \
            "etc/$p/$p.toml" "usr/share/man/man8/$p.8.gz" "usr/lib/systemd/system/$p.service"
        ;;
    esac
    case $p in
    relayd) echo usr/lib/systemd/system/relayd.socket ;;
    agentd) echo usr/lib/systemd/user/agentd.service ;;
    tunnelctl)
        printf '%s\n' usr/share/man/man1/tunnelctl.1.gz \
            usr/share/bash-completion/completions/tunnelctl \
            usr/share/zsh/vendor-completions/_tunnelctl \
            usr/share/fish/vendor_completions.d/tunnelctl.fish
        ;;
    esac
}

for p in relayd agentd tunnelctl; do
    deb=$out/${p}_${version}-1_${arch}.deb
    [ -f "$deb" ] || fail "$deb is missing: run packaging/build.sh first"
    run dpkg-deb -I "$deb"
    run dpkg-deb -c "$deb"
    listing=$(dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./||')
    for f in $(expect_deb "$p"); do
        grep -qx "$f" <<<"$listing" || fail "$deb lacks /$f"
    done
    case $p in
    relayd | agentd)
        conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./conffiles)
        [ "$conffiles" = "/etc/$p/$p.toml" ] || fail "$deb conffiles: $conffiles"
        depends=$(dpkg-deb -f "$deb" Depends)
        for d in tunnelctl procps systemd; do
            grep -qw "$d" <<<"$depends" || fail "$deb does not depend on $d: $depends"
        done
        # The user unit needs pam_systemd (see agentd/Cargo.toml).
        if [ "$p" = agentd ]; then
            grep -qw libpam-systemd <<<"$depends" || fail "$deb does not depend on libpam-systemd: $depends"
        fi
        ;;
    esac
    echo "layout of $deb: ok" >&2
    run lintian --fail-on error,warning --display-info "$deb"
    echo "lintian $deb: passed" >&2
done

for p in relayd agentd tunnelctl; do
    rpmfile=$out/$p-$version-1.$(uname -m).rpm
    [ -f "$rpmfile" ] || fail "$rpmfile is missing: run packaging/build.sh first"
    run rpm -qpi "$rpmfile"
    run rpm -qpl "$rpmfile"
    run rpm -qp --scripts "$rpmfile"
    run rpm -qp --requires "$rpmfile"
    run rpm -qp --configfiles "$rpmfile"
    listing=$(rpm -qpl "$rpmfile")
    grep -qx "/usr/bin/$p" <<<"$listing" || fail "$rpmfile lacks /usr/bin/$p"
    # (rpmlint 2.4.0 cannot check this one: see packaging/rpmlint.toml.)
    grep -qE "^/usr/share/man/man[18]/$p\.[18]\.gz$" <<<"$listing" || fail "$rpmfile lacks the man page"
    case $p in
    relayd | agentd)
        [ "$(rpm -qp --configfiles "$rpmfile")" = "/etc/$p/$p.toml" ] || fail "$rpmfile config files"
        # cargo-generate-rpm takes a script path it cannot find as the
        # script's text: make sure the real scriptlets went in.
        scripts=$(rpm -qp --scripts "$rpmfile")
        for s in "systemd-sysusers $p.conf" "systemd-tmpfiles --create $p.conf" "daemon-reload" "disable --now"; do
            grep -qF "$s" <<<"$scripts" || fail "$rpmfile scriptlets lack '$s'"
        done
        ;;
    esac
    echo "layout of $rpmfile: ok" >&2
    run rpmlint --strict -c packaging/rpmlint.toml "$rpmfile"
    echo "rpmlint $rpmfile: passed" >&2
done

run ruby -c packaging/homebrew/llm-tunnel.rb
run python3 -c 'import plistlib,sys; d=plistlib.load(open(sys.argv[1],"rb")); print(sys.argv[1]+": Label "+d["Label"]+", "+" ".join(d["ProgramArguments"][:1]))' \
    packaging/launchd/com.llm-tunnel.agentd.plist
echo "packaging lint: all passed" >&2
