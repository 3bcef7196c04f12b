#!/usr/bin/env bash
# Issue #12, item 6: a real arm64 cpsl-agent, run under qemu-user, trains beside an x86 agent
# with the x86 edge server in a short CPSL run; and the arm64 device's profile, taken under
# emulation (so labelled: its times are QEMU's, not a board's).
#
#   bench/arm64_agent.sh [ROOTFS] [OUT]     (root; default /var/tmp/cpsl-arm64-root, bench/results/arm64)
#   INSTALL_ONLY=1 bench/arm64_agent.sh     only build and install (the slow part), run nothing
#
# Builds (or reuses) an arm64 Debian bookworm rootfs with debootstrap, installs the agent's
# install profile there with PyPI's CPU torch for aarch64 (TORCH_ARM64, default torch==2.5.1:
# PyPI's 2.13.0 for aarch64 is a CUDA build that segfaults under QEMU), and runs. Needs
# debootstrap, qemu-user-static with binfmt_misc, mosquitto, and network to Debian and PyPI.
# Not part of CI: the install under emulation takes tens of minutes.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
rootfs="${1:-/var/tmp/cpsl-arm64-root}"
out="${2:-$repo/bench/results/arm64}"
py="${PYTHON:-$repo/.venv/bin/python}"
torch_arm64="${TORCH_ARM64:-torch==2.5.1}"
[ "$(id -u)" = 0 ] || { echo "arm64_agent.sh: needs root (debootstrap, chroot)" >&2; exit 2; }

mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64

mounted=()
cleanup() {
    for pid in $(jobs -p); do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT

started=$(date +%s)
if [ ! -x "$rootfs/usr/bin/python3" ]; then
    echo "== debootstrap arm64 bookworm into $rootfs (under QEMU: about 10 minutes)"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian
fi
for fs in proc sys dev; do
    mount --rbind "/$fs" "$rootfs/$fs" && mounted+=("$rootfs/$fs")
done
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
# the host's CA bundle (for networks that intercept TLS), and none of the host's pip settings
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/host-ca.crt"
inside=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
    PIP_CERT=/etc/ssl/certs/host-ca.crt chroot "$rootfs")
pip=("${inside[@]}" /opt/cpsl-edge/bin/pip install --disable-pip-version-check)
if [ ! -x "$rootfs/opt/cpsl-edge/bin/python" ]; then
    "${inside[@]}" python3 -m venv /opt/cpsl-edge
fi
want="${torch_arm64#torch==}"
if ! "${inside[@]}" /opt/cpsl-edge/bin/python -c \
    "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$want')" 2>/dev/null; then
    echo "== $torch_arm64 for aarch64 from PyPI (under QEMU)"
    "${pip[@]}" "$torch_arm64"
fi
rm -rf "$rootfs/opt/src" && mkdir -p "$rootfs/opt/src"
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/toolkit" "$repo/firmware_agent" "$repo/edge_server" "$rootfs/opt/src/"
echo "== cpsl-edge[agent] into the arm64 venv"
"${pip[@]}" --quiet "/opt/src[agent]"
"${pip[@]}" --quiet --no-deps --force-reinstall /opt/src  # this checkout's code, even over an older install
install_s=$(($(date +%s) - started))
if [ -n "${INSTALL_ONLY:-}" ]; then
    echo "installed in ${install_s} s (INSTALL_ONLY: not running)"
    exit 0
fi

work="$(mktemp -d /tmp/cpsl-arm64.XXXXXX)"
mkdir -p "$out"
rm -rf "$rootfs/srv/digits"
(cd "$repo" && "$py" -c "from pathlib import Path; from tests.datafiles import digits_idx; digits_idx(Path('$work/digits'))")
cp -r "$work/digits" "$rootfs/srv/digits"

echo "== cpsl-profile under emulation"
profile_started=$(date +%s)
"${inside[@]}" /opt/cpsl-edge/bin/cpsl-profile --model lenet5 --input-shape 1,28,28 --batch-size 16 \
    --repeats 5 --warmup 2 --passes 1 --threads 1 --no-onnx --device-id arm64-qemu \
    --out /srv/arm64-qemu-lenet5.json >"$work/profile.log" 2>&1
profile_s=$(($(date +%s) - profile_started))
cp "$rootfs/srv/arm64-qemu-lenet5.json" "$out/arm64-qemu-lenet5.json"

port=$("$py" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" >"$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
sleep 1
broker="mqtt://127.0.0.1:$port"
echo "== training: one x86 agent, one arm64 agent under QEMU, the x86 edge server"
(cd "$repo" && exec "$py" -m firmware_agent --broker "$broker" --device-id x86-0 --data "idx:$work/digits" \
    --partition 0/2 --no-profile >"$work/agent-x86.log" 2>&1) &
"${inside[@]}" /opt/cpsl-edge/bin/cpsl-agent --broker "$broker" --device-id arm64-0 --data idx:/srv/digits \
    --partition 1/2 --profile /srv/arm64-qemu-lenet5.json --keepalive 300 >"$work/agent-arm64.log" 2>&1 &
run_started=$(date +%s)
rm -rf "$out/run"
(cd "$repo" && "$py" -m edge_server --broker "$broker" --model lenet5 --data "idx:$work/digits" \
    --min-devices 2 --scheme cpsl --no-auto --clusters 1 --rounds 6 --local-iterations 20 --timeout 900 \
    --run-dir "$out/run" >"$work/server.log" 2>&1) || { tail -20 "$work/server.log" "$work/agent-arm64.log"; exit 1; }
run_s=$(($(date +%s) - run_started))
cp "$work"/*.log "$out/" 2>/dev/null || true
rm -rf "$work"
rm -f "$out/run/"*.pt "$out/run/"*.onnx

"$py" - "$out" "$install_s" "$profile_s" "$run_s" "$torch_arm64" <<'PY'
import json, sys
from pathlib import Path
out, install_s, profile_s, run_s, torch_spec = Path(sys.argv[1]), *map(int, sys.argv[2:5]), sys.argv[5]
records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
profile = json.loads((out / "arm64-qemu-lenet5.json").read_text())
report = {
    "command": "sudo bench/arm64_agent.sh",
    "emulated": "arm64 under qemu-user on x86-64: times are QEMU's, not a board's",
    "torch_arm64": torch_spec,
    "install_s": install_s,
    "profile_s": profile_s,
    "run_wall_s": run_s,
    "rounds": [
        {"round": r["round"], "clusters": r["clusters"], "dropped": r["dropped"], "latency_s": r["latency_s"],
         "accuracy": r.get("accuracy")}
        for r in records
    ],
    "arm64_device": profile["device"],
}
(out / "arm64_agent.json").write_text(json.dumps(report, indent=1))
print(json.dumps({k: report[k] for k in ("install_s", "profile_s", "run_wall_s")}))
for r in report["rounds"]:
    print(r)
PY
