#!/usr/bin/env bash
# Build a lab host image (systemd as PID 1) from Debian's packages, no registry needed.
#
#   files/lab/build-image.sh bookworm|trixie
#
# The image is tagged llm-lab/debian:<suite>-<hash of this script>, plus :<suite>,
# so an unchanged script reuses the image built earlier and a changed one rebuilds it.
set -euo pipefail

suite=${1:?usage: build-image.sh bookworm|trixie}
case "$suite" in bookworm | trixie) ;; *) echo "unknown suite: $suite" >&2; exit 2 ;; esac

here=$(cd "$(dirname "$0")" && pwd)
recipe_hash=$(sha256sum "$0" | cut -c1-12)
image="llm-lab/debian:${suite}-${recipe_hash}"
mirror=${LAB_DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$image" >/dev/null 2>&1; then
  docker tag "$image" "llm-lab/debian:${suite}"
  echo "image $image already built"
  exit 0
fi

# What every lab host needs before Ansible can manage it: systemd, sudo (plays
# use become as on real hosts), Python for the
# modules, apt bindings for ansible.builtin.apt, and tools the tests look with.
packages=systemd,systemd-sysv,dbus,sudo,python3,python3-apt,ca-certificates,iproute2,procps,curl,less,gnupg

root=$(mktemp -d /var/tmp/llm-lab-rootfs.XXXXXX)
# debootstrap mounts /proc and /sys inside the root: unmount them before removing
# it, and never let rm cross into a mounted file system.
cleanup() {
  # grep finds nothing once debootstrap unmounted them itself: not an error.
  { findmnt -rn -o TARGET | grep "^$root/" || true; } | sort -r | xargs -r -n1 umount -l
  rm -rf --one-file-system "$root" "$root.log"
}
trap cleanup EXIT
echo "debootstrap $suite into $root (about a minute)"
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >"$root.log" 2>&1 ||
  { tail -20 "$root.log" >&2; exit 1; }

# Security and point-release updates, like any real host.
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
EOF

# Trust the same extra certificate authorities as this machine, so HTTPS to the
# package registries works from inside the lab hosts.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null 2>&1
fi

# Units that make no sense in a container and only slow boot or fail.
for unit in systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
  getty.target console-getty.service systemd-firstboot.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
echo "llm-lab" >"$root/etc/hostname"
# Package lists of the sources above, as a host fresh from an installer has them
# (an empty list directory would look fresh to apt's cache_valid_time).
chroot "$root" apt-get update -qq
rm -rf "$root"/var/cache/apt/archives/*.deb

tar -C "$root" -c . | docker import \
  -c 'CMD ["/lib/systemd/systemd"]' -c 'ENV container=docker' \
  - "$image" >/dev/null
docker tag "$image" "llm-lab/debian:${suite}"
# Images of earlier recipes are dead weight now.
docker images --format '{{.Repository}}:{{.Tag}}' "llm-lab/debian" |
  grep "^llm-lab/debian:${suite}-" | grep -vx "$image" | xargs -r docker rmi >/dev/null || true
echo "built $image"
