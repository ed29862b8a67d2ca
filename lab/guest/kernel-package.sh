#!/bin/sh
# Print the name of the kernel image package that linux-image-cloud-amd64
# currently points at (e.g. linux-image-6.1.0-56-cloud-amd64).
set -eu
p=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$p" ]; then
    echo "kernel-package.sh: apt-cache knows no linux-image-cloud-amd64 (run apt-get update)" >&2
    exit 1
fi
echo "$p"
