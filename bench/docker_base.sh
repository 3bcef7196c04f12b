#!/usr/bin/env bash
# A Debian bookworm base image for Dockerfile.edge where no registry can be reached:
# debootstrap a minimal root file system with Python 3.11 and import it.
#   bench/docker_base.sh [IMAGE]        (default cpsl-edge-base:bookworm; needs root, debootstrap, docker)
# Then: cp TORCH_WHEEL docker/wheels/ (optional) and
#   docker build -f Dockerfile.edge --build-arg BASE=cpsl-edge-base:bookworm \
#       --build-arg TORCH_SPEC=torch==VERSION -t cpsl-edge-agent .
set -euo pipefail
image="${1:-cpsl-edge-base:bookworm}"
root="$(mktemp -d /tmp/cpsl-bookworm.XXXXXX)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" http://deb.debian.org/debian
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$image"
docker image inspect --format '{{.Size}}' "$image" | awk -v i="$image" '{printf "%s: %.0f MB\n", i, $1 / 1e6}'
