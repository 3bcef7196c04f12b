#!/usr/bin/env bash
# Issue #15's GPU checks, step 1 of 2 -- run HERE (a machine with PyPI and Debian's archive),
# before asking for a GPU machine: fetches into .gpu/ (git-ignored, ~20 MB) what the GPU
# machine's image lacks. That image (../.library/device/KINDS.md) has Python 3.12, torch with
# CUDA, numpy, scipy, rich, psutil, aiohttp, pytest -- but no paho-mqtt, pydantic,
# cryptography or zstandard, and no Mosquitto; nothing can be fetched there.
#
#   bash bench/gpu/prepare.sh
#   then, with the device tool: run(command="bash bench/gpu/run.sh", carry=[".gpu"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/deb

# The wheels, resolved together for CPython 3.12 on x86-64 (pydantic and pydantic-core must match).
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d .gpu/whl \
    'paho-mqtt>=2.0,<3' 'pydantic>=2.5' 'cryptography>=42' 'zstandard>=0.22'

# Mosquitto and every library it links that a stock image may lack (not libc); unpacked there
# into a private prefix and run through a wrapper, so nothing else sees these libraries.
(cd .gpu/deb && apt-get download -q mosquitto libmosquitto1 libcjson1 libdlt2 libwrap0 libnsl2 \
    libtirpc3 libtirpc-common libssl3 libsystemd0 libcap2 libgcrypt20 libgpg-error0 liblz4-1 \
    liblzma5 libzstd1 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1)
du -sh .gpu
ls .gpu/whl .gpu/deb
