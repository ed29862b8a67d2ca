#!/usr/bin/env bash
# Build the lab's second guest template: a real Debian 12 with systemd, cloud-init and
# OpenSSH, from Debian packages (mmdebstrap), so the tests check that what devvm writes
# works with the software users run.
#
#   lab/guest/build-debian.sh OUTDIR
#
# Writes OUTDIR/vmlinuz, OUTDIR/initrd.img, OUTDIR/devvm-debian12-cloud.qcow2,
# OUTDIR/cmdline and OUTDIR/manifest.txt. No loop mounts: the root file system is made
# with `mke2fs -d` from the directory mmdebstrap filled. The root file system is the
# whole disk (/dev/vda, ext4, no partition table), booted with the kernel and initrd
# beside it, like the busybox template. The lab's chef-client stand-in is installed as
# /usr/bin/chef-client (a real Chef cannot be installed in the lab).
set -euo pipefail

out=${1:?usage: build-debian.sh OUTDIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
name=devvm-debian12-cloud
work=$out/build
rm -rf "$work"
mkdir -p "$work"
log() { echo "build-debian: $*"; }

export SOURCE_DATE_EPOCH=1700000000
root=$work/root
# ifupdown with resolvconf: cloud-init renders its network config as /etc/network/interfaces.d
# (Debian's default), and resolvconf applies its name servers. e2fsprogs: cloud-init grows
# the root file system; locales: it sets the locale.
pkgs=systemd-sysv,udev,cloud-init,openssh-server,python3,linux-image-cloud-amd64,ifupdown,resolvconf,iproute2,netbase,busybox,ca-certificates,e2fsprogs,locales
log "mmdebstrap bookworm with $pkgs"
# The machine's own Debian sources (this host runs bookworm too).
mmdebstrap --variant=apt --include="$pkgs" \
    --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    bookworm "$root"

# What the lab guest needs around Debian's defaults
cat > "$root/etc/fstab" <<'FSTAB'
/dev/vda / ext4 rw,errors=remount-ro 0 1
FSTAB
# NoCloud only: no waiting on metadata services that do not exist here.
cat > "$root/etc/cloud/cloud.cfg.d/90-devvm-lab.cfg" <<'CFG'
# devvm lab: the first-boot seed is a NoCloud cidata disk; look for nothing else.
datasource_list: [NoCloud, None]
# built into glibc: nothing to generate at first boot
locale: C.UTF-8
CFG
# No password for anyone; the only way in is SSH with a key.
echo "devvm-lab-debian" > "$root/etc/hostname"
install -m 0755 "$here/chef-client" "$root/usr/bin/chef-client"
mkdir -p "$root/etc/chef" "$root/var/chef"

kernel=$(ls "$root"/boot/vmlinuz-* | head -1)
initrd=$(ls "$root"/boot/initrd.img-* | head -1)
kver=${kernel##*/vmlinuz-}
cp "$kernel" "$out/vmlinuz"
cp "$initrd" "$out/initrd.img"
log "kernel $kver"

# The root file system, 1 GiB virtual (sparse; the lab's default disk size), as qcow2
raw=$work/root.ext4
truncate -s 1G "$raw"
mke2fs -q -t ext4 -L devvm-root -d "$root" -E root_owner=0:0 "$raw"
qemu-img convert -q -f raw -O qcow2 "$raw" "$out/$name.qcow2"
rm -f "$raw"
echo "root=/dev/vda rw console=ttyS0 net.ifnames=0" > "$out/cmdline"
{
    echo "template=$name"
    echo "kernel_version=$kver"
    echo "packages=$pkgs"
    chroot "$root" dpkg-query -W cloud-init openssh-server systemd 2>/dev/null | sed 's/\t/=/; s/^/version: /'
} > "$out/manifest.txt"
rm -rf "$work"
log "built $out/$name.qcow2 ($(du -h "$out/$name.qcow2" | cut -f1) allocated)"
