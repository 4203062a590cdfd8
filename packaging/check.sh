#!/usr/bin/env bash
# CI check of the Debian package (issue 15, item 5), after the release build, as root:
#   1. builds it (packaging/build-deb.sh; installs cargo-deb first if it is missing),
#   2. `systemd-analyze verify` of the unit,
#   3. installs it into a clean Debian bookworm chroot (debootstrap --variant=minbase,
#      cached as a tarball in /var/cache/causeway-ci/) with apt, and checks what it
#      promises: the binary runs, the causeway user, the files, the directories' owners,
#      check-config accepts the example; then an upgrade, a remove and a purge.
# Needs: debootstrap, systemd (systemd-analyze), dpkg-dev, network access to the mirror.
# Nothing is mounted; the chroot is deleted at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

MIRROR=${CAUSEWAY_CI_MIRROR:-http://deb.debian.org/debian}
CACHE=/var/cache/causeway-ci
TARBALL=$CACHE/bookworm-minbase.tar.gz
TARGET=${CARGO_TARGET_DIR:-target}
SECONDS=0

step() { echo "== packaging: $* (${SECONDS}s)"; }
fail() {
  echo "packaging/check.sh: FAILED: $*" >&2
  exit 1
}

[ "$(id -u)" = 0 ] || fail "run as root (debootstrap and chroot need it)"
for tool in debootstrap:debootstrap systemd-analyze:systemd dpkg-shlibdeps:dpkg-dev; do
  command -v "${tool%%:*}" >/dev/null ||
    fail "${tool%%:*} is missing: apt-get install -y ${tool##*:}"
done

work=$(mktemp -d /var/tmp/causeway-pkgcheck.XXXXXX)
root=$work/root
cleanup() {
  # Never delete through a mount point (this script mounts nothing; refuse if one appeared).
  if findmnt -rno TARGET | grep -q "^$work"; then
    echo "packaging/check.sh: something is mounted under $work: left in place" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

# 1. The package.
if ! command -v cargo-deb >/dev/null; then
  step "installing cargo-deb (cargo install cargo-deb --locked: about 4-5 minutes on 2 cores)"
  timeout 1800 cargo install cargo-deb --locked || fail "cargo install cargo-deb"
fi
step "building the package"
timeout 900 packaging/build-deb.sh || fail "packaging/build-deb.sh"
debs=("$TARGET"/debian/causeway_*.deb)
[ "${#debs[@]}" = 1 ] && [ -f "${debs[0]}" ] || fail "expected one causeway_*.deb in $TARGET/debian, found: ${debs[*]}"
deb=${debs[0]}
version=$("$TARGET/release/causeway" --version)
dpkg-deb --info "$deb" >"$work/info"
dpkg-deb --contents "$deb" >"$work/contents"
grep -q '^ Depends:.*adduser' "$work/info" || fail "Depends lacks adduser: $(grep Depends "$work/info")"
grep -q '^ Recommends: postgresql-15, iproute2' "$work/info" || fail "Recommends is not postgresql-15, iproute2"
if grep -q '^ Description: \[generated' "$work/info"; then
  echo "packaging/check.sh: warning: the package has no description: add description = \"…\" to [package] in crates/causeway/Cargo.toml" >&2
fi

# 2. The unit: verified as installed, but with ExecStart on the binary just built (the
# host has no /usr/bin/causeway).
step "systemd-analyze verify packaging/causeway.service"
mkdir -p "$work/unit"
sed "s|/usr/bin/causeway|$(realpath "$TARGET/release/causeway")|g" packaging/causeway.service >"$work/unit/causeway.service"
if ! timeout 60 systemd-analyze verify "$work/unit/causeway.service" >"$work/verify" 2>&1 ||
  grep -q 'causeway.service' "$work/verify"; then
  cat "$work/verify" >&2
  fail "systemd-analyze verify found problems in packaging/causeway.service"
fi

# 3. A clean chroot: the cached pristine tarball, made once per machine.
mkdir -p "$CACHE"
(
  flock -w 1800 9 || fail "another check holds $CACHE/lock"
  if [ ! -s "$TARBALL" ]; then
    step "debootstrap --variant=minbase bookworm (once; cached as $TARBALL)"
    timeout 1800 debootstrap --variant=minbase bookworm "$work/pristine" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
      tail -20 "$work/debootstrap.log" >&2
      fail "debootstrap (log above)"
    }
    tar -C "$work/pristine" -czf "$TARBALL.new" . && mv "$TARBALL.new" "$TARBALL"
    rm -rf "$work/pristine"
  fi
) 9>"$CACHE/lock"
step "unpacking the chroot"
mkdir -p "$root"
tar -C "$root" -xzf "$TARBALL" || fail "unpacking $TARBALL (delete it to rebuild it)"
cp /etc/resolv.conf "$root/etc/resolv.conf"
install -m 0644 "$deb" "$root/tmp/"
in_root() { timeout 600 chroot "$root" "$@"; }

step "apt-get install $(basename "$deb") in the chroot"
in_root apt-get update -qq || fail "apt-get update in the chroot (network, mirror $MIRROR)"
in_root apt-get install -y -q --no-install-recommends "/tmp/$(basename "$deb")" >"$work/install.log" 2>&1 || {
  cat "$work/install.log" >&2
  fail "apt-get install of the package in a clean bookworm"
}
grep -q 'no node file yet, so nothing was started' "$work/install.log" ||
  fail "postinst did not say what to do next: $(cat "$work/install.log")"
sed -n '/^causeway: no node file yet/,/journalctl/p' "$work/install.log"

step "checking the installed package"
got=$(in_root causeway --version) || fail "causeway --version does not run in the chroot"
[ "$got" = "$version" ] || fail "causeway --version in the chroot: '$got', built: '$version'"
in_root getent passwd causeway | grep -q ':/var/lib/causeway:/usr/sbin/nologin$' ||
  fail "user causeway: $(in_root getent passwd causeway || echo missing)"
in_root getent group causeway >/dev/null || fail "group causeway is missing"
owner() { in_root stat -c '%U:%G %a' "$1"; }
[ "$(owner /var/lib/causeway)" = "causeway:causeway 700" ] || fail "/var/lib/causeway is $(owner /var/lib/causeway)"
[ "$(owner /etc/causeway)" = "root:causeway 770" ] || fail "/etc/causeway is $(owner /etc/causeway)"
for f in /usr/bin/causeway /lib/systemd/system/causeway.service \
  /usr/share/bash-completion/completions/causeway /usr/share/zsh/vendor-completions/_causeway \
  /usr/share/fish/vendor_completions.d/causeway.fish /usr/share/doc/causeway/node.toml.example \
  /etc/causeway/node.toml.example /usr/share/doc/causeway/install.md /usr/share/doc/causeway/README.md; do
  [ -s "$root$f" ] || fail "$f is not installed"
done
cmp -s packaging/causeway.service "$root/lib/systemd/system/causeway.service" || fail "the installed unit differs from packaging/causeway.service"
grep -q 'complete -F _causeway' "$root/usr/share/bash-completion/completions/causeway" || fail "the bash completion is not one"
in_root dpkg-query -W -f='${Conffiles}\n' causeway | grep -q '/etc/causeway/node.toml.example' ||
  fail "/etc/causeway/node.toml.example is not a conffile"
# The documented first step, then check-config as the service's user.
in_root install -o root -g causeway -m 0640 /etc/causeway/node.toml.example /etc/causeway/node.toml
in_root runuser -u causeway -- causeway check-config --config /etc/causeway/node.toml >"$work/check-config" 2>&1 || {
  cat "$work/check-config" >&2
  fail "check-config refuses the example node file"
}
grep -q ': valid$' "$work/check-config" || fail "check-config: $(cat "$work/check-config")"

step "upgrade (reinstall), remove, purge"
in_root dpkg -i "/tmp/$(basename "$deb")" >"$work/upgrade.log" 2>&1 || {
  cat "$work/upgrade.log" >&2
  fail "reinstalling over itself"
}
[ "$(owner /var/lib/causeway)" = "causeway:causeway 700" ] || fail "after an upgrade /var/lib/causeway is $(owner /var/lib/causeway)"
echo data >"$root/var/lib/causeway/keep-me"
in_root apt-get remove -y -q causeway >"$work/remove.log" 2>&1 || {
  cat "$work/remove.log" >&2
  fail "apt-get remove"
}
[ ! -e "$root/usr/bin/causeway" ] || fail "remove left /usr/bin/causeway"
[ -e "$root/var/lib/causeway/keep-me" ] && [ -e "$root/etc/causeway/node.toml" ] ||
  fail "remove deleted the node's data or node file"
in_root apt-get purge -y -q causeway >"$work/purge.log" 2>&1 || {
  cat "$work/purge.log" >&2
  fail "apt-get purge"
}
[ ! -e "$root/var/lib/causeway" ] || fail "purge left /var/lib/causeway"
[ ! -e "$root/etc/causeway" ] || fail "purge left /etc/causeway: $(ls -A "$root/etc/causeway")"

step "OK: $(basename "$deb") ($(du -h "$deb" | cut -f1)) installs on a clean bookworm; the unit verifies"
