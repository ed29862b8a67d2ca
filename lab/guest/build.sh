#!/usr/bin/env bash
# Build the devvm lab guest template from Debian packages.
#
#   lab/guest/build.sh OUTDIR
#
# Writes OUTDIR/vmlinuz, OUTDIR/initrd.img, OUTDIR/devvm-debian12.qcow2,
# OUTDIR/cmdline and OUTDIR/manifest.txt. No debootstrap, no loop mounts:
# packages are fetched with `apt-get download` and unpacked with
# `dpkg-deb -x`; the root file system is made with `mke2fs -d`.
# Shared libraries of the guest's dynamically linked programs (dropbear,
# sftp-server) are copied from this host, which runs the same Debian release
# (the host has dropbear-bin installed for that). From openssh-client only
# scp is kept (the remote end of legacy scp).
set -euo pipefail

out=${1:?usage: build.sh OUTDIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=$out/build
rm -rf "$work"
mkdir -p "$work/debs" "$work/x" "$work/initramfs" "$work/rootfs"

log() { echo "build: $*"; }

# fixed times and ids, so that a rebuild from the same inputs gives the same
# bytes (and Glance keeps the images it has)
export SOURCE_DATE_EPOCH=1700000000
FS_UUID=d3b0c9a4-5e2f-4c1a-9a57-0de7f0e1a001

kpkg=$("$here/kernel-package.sh")
pkgs=("$kpkg" busybox-static dropbear-bin openssh-sftp-server openssh-client)
log "downloading ${pkgs[*]}"
download() {
    (cd "$work/debs" && apt-get download -q "${pkgs[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed') || true
    for p in "${pkgs[@]}"; do
        ls "$work/debs/${p}_"*.deb >/dev/null 2>&1 || return 1
    done
}
if ! download; then
    # old package lists can name versions the mirror no longer has
    log "download failed; running apt-get update and trying again"
    apt-get update -q
    kpkg=$("$here/kernel-package.sh")
    pkgs=("$kpkg" "${pkgs[@]:1}")
    download || { echo "build: apt-get download ${pkgs[*]} failed" >&2; exit 1; }
fi
for d in "$work"/debs/*.deb; do dpkg-deb -x "$d" "$work/x"; done
X=$work/x

kver=$(basename "$(ls "$X"/boot/vmlinuz-*)"); kver=${kver#vmlinuz-}
moddir=$X/lib/modules/$kver
log "kernel $kver"
if [ ! -s "$moddir/modules.dep" ]; then
    if command -v depmod >/dev/null 2>&1; then
        depmod -b "$X" "$kver"
    else
        "$X/bin/busybox" depmod -b "$X" "$kver"
    fi
fi

# --- initramfs: busybox + modules + /init ---------------------------------
I=$work/initramfs
mkdir -p "$I"/{bin,dev,proc,sys,newroot,etc,lib/modules}
cp "$X/bin/busybox" "$I/bin/busybox"
mknod -m 600 "$I/dev/console" c 5 1
mknod -m 666 "$I/dev/null" c 1 3
install -m 0755 "$here/initramfs-init" "$I/init"

# modules the guest needs (the rest of what it uses is built in), closed
# over modules.dep and listed in load order
want="virtio_pci virtio_blk virtio_net virtio_rng virtio_scsi ata_piix sd_mod sr_mod isofs vfat nls_cp437 nls_iso8859_1 nls_utf8 nls_ascii"
declare -A modpath=() seen=()
while IFS=: read -r path _; do
    b=$(basename "$path" .ko); modpath[${b//-/_}]=$path
done < "$moddir/modules.dep"
declare -A deps=()
while IFS=: read -r path rest; do
    b=$(basename "$path" .ko); deps[${b//-/_}]=$rest
done < "$moddir/modules.dep"
order=()
visit() {
    local m=${1//-/_} d
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    [ -n "${modpath[$m]:-}" ] || { log "module $m is built in or missing; skipped"; return 0; }
    for d in ${deps[$m]}; do visit "$(basename "$d" .ko)"; done
    order+=("$m")
}
for m in $want; do visit "$m"; done
: > "$I/etc/modules.load"
for m in "${order[@]}"; do
    cp "$moddir/${modpath[$m]}" "$I/lib/modules/$m.ko"
    echo "$m" >> "$I/etc/modules.load"
done
log "initramfs modules: ${order[*]}"
# reproducible: fixed mtimes, sorted cpio, no gzip name/time
find "$I" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$I" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --reproducible) | gzip -n -6 > "$work/initrd.img"

# --- root file system ------------------------------------------------------
R=$work/rootfs
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64,usr/lib/openssh,usr/lib/devvm,usr/libexec}
mkdir -p "$R"/{etc/init.d,etc/dropbear,etc/chef,proc,sys,dev,run,tmp,mnt,home,var/log,var/chef,var/tmp}
install -d -m 0700 "$R/root" "$R/root/.ssh"
chmod 1777 "$R/tmp" "$R/var/tmp"
ln -s usr/lib "$R/lib"
ln -s usr/lib64 "$R/lib64"
ln -s /run "$R/var/run"
cp "$X/bin/busybox" "$R/bin/busybox"
"$R/bin/busybox" --list-full | while read -r a; do
    [ -e "$R/$a" ] || [ -L "$R/$a" ] || ln -s /bin/busybox "$R/$a"
done
install -m 0755 "$X/usr/sbin/dropbear" "$R/usr/sbin/dropbear"
install -m 0755 "$X/usr/bin/dropbearkey" "$R/usr/bin/dropbearkey"
install -m 0755 "$X/usr/bin/dropbearconvert" "$R/usr/bin/dropbearconvert"
install -m 0755 "$X/usr/lib/openssh/sftp-server" "$R/usr/lib/openssh/sftp-server"
install -m 0755 "$X/usr/bin/scp" "$R/usr/bin/scp"   # server side of legacy scp (scp -t)
ln -s openssh/sftp-server "$R/usr/lib/sftp-server"
ln -s ../lib/openssh/sftp-server "$R/usr/libexec/sftp-server"
# shared libraries, from this host (same Debian release)
for b in usr/sbin/dropbear usr/bin/dropbearkey usr/bin/dropbearconvert usr/lib/openssh/sftp-server usr/bin/scp; do
    ldd "$R/$b" | awk '/=> \//{print $3} /^[ \t]*\/[^ ]*ld-linux/{print $1}'
done | sort -u | while read -r lib; do
    case "$lib" in
        */ld-linux-x86-64.so.2) cp -L "$lib" "$R/usr/lib64/ld-linux-x86-64.so.2" ;;
        *) cp -L "$lib" "$R/usr/lib/x86_64-linux-gnu/$(basename "$lib")" ;;
    esac
done
install -m 0644 "$here/inittab" "$R/etc/inittab"
install -m 0755 "$here/rcS" "$R/etc/init.d/rcS"
install -m 0644 "$here/yaml.awk" "$R/usr/lib/devvm/yaml.awk"
install -m 0755 "$here/chef-client" "$R/usr/bin/chef-client"
cat > "$R/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
P
cat > "$R/etc/group" <<'P'
root:x:0:
tty:x:5:
nogroup:x:65534:
P
printf 'root:*:19000:0:99999:7:::\n' > "$R/etc/shadow"; chmod 0600 "$R/etc/shadow"
printf '/bin/sh\n/bin/ash\n' > "$R/etc/shells"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' > "$R/etc/nsswitch.conf"
printf 'export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1="\\h:\\w\\$ "\n' > "$R/etc/profile"
printf 'devvm\n' > "$R/etc/hostname"
printf '127.0.0.1 localhost\n' > "$R/etc/hosts"
: > "$R/etc/resolv.conf"
cat > "$R/etc/os-release" <<P
PRETTY_NAME="devvm lab guest (Debian 12 packages, busybox + dropbear)"
NAME="devvm-lab-guest"
ID=devvm-lab
ID_LIKE=debian
VERSION_ID=12
P
{
    echo "kernel=$kpkg $kver"
    for d in "$work"/debs/*.deb; do dpkg-deb --show --showformat='${Package}=${Version}\n' "$d"; done
} > "$R/etc/devvm-release"

rootimg=$work/root.img
find "$R" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mke2fs -q -t ext4 -L devvm-root -U "$FS_UUID" \
    -E "root_owner=0:0,hash_seed=$FS_UUID" -d "$R" -F "$rootimg" 512M
qemu-img convert -f raw -O qcow2 -o compat=1.1 "$rootimg" "$work/devvm-debian12.qcow2"
rm -f "$rootimg"

cp "$X/boot/vmlinuz-$kver" "$work/vmlinuz"
echo "root=/dev/vda rw console=ttyS0 net.ifnames=0" > "$work/cmdline"
{
    echo "kernel_version=$kver"
    cat "$R/etc/devvm-release"
    echo "initramfs_modules=${order[*]}"
    (cd "$work" && sha256sum vmlinuz initrd.img devvm-debian12.qcow2)
} > "$work/manifest.txt"

for f in vmlinuz initrd.img devvm-debian12.qcow2 cmdline manifest.txt; do
    mv -f "$work/$f" "$out/$f"
done
rm -rf "$work"
log "done: $(du -sh "$out/devvm-debian12.qcow2" | cut -f1) root disk, $(du -sh "$out/initrd.img" | cut -f1) initrd"
