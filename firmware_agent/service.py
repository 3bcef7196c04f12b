"""The agent as a systemd service: the unit, and installing, removing and inspecting it.

A board runs one agent for its whole life, across runs and reboots, so it belongs under
systemd: restarted when it fails, started at boot once the network is up, logging to the
journal. The unit is hardened as far as a process that trains with torch and talks MQTT
allows (``systemd-analyze security`` exposure about 2; an unhardened unit scores 9.2):

- its own unprivileged system user, made by ``systemd-sysusers`` from a sysusers.d entry
  (the systemd way, and it works on an image offline with ``--root``);
- the state directory ``/var/lib/cpsl-agent`` holds the cached device profile
  (``XDG_CACHE_HOME`` points there), and nothing else on the file system is writable;
- no capabilities, no device nodes, no new privileges, no namespaces, only IP and Unix
  sockets, the ``@system-service`` system calls.

An agent configured to train on the GPU (``device = "cuda"``, ``"cuda:N"`` or ``"auto"``) gets
a unit that can reach it: the host's /dev instead of a private one, but the device cgroup still
closed except for NVIDIA's device groups (``char-nvidia*``: the driver's nodes on a PC;
``char-nv*``/``char-host1x*`` and /dev/nvmap: a Jetson's integrated GPU under L4T), and the
``video`` and ``render`` groups Jetson's nodes belong to -- which needs the real group ids,
so no ``PrivateUsers``. Its exposure is still under 3.5.

Left open on purpose: ``MemoryDenyWriteExecute`` (oneDNN, torch's CPU kernels, compiles
kernels at run time into executable memory and fails under it) and ``ProcSubset=pid``
(psutil reads /proc/meminfo and /proc/stat for the memory and CPU figures the agent
reports).

The configuration file and what it names (TLS bundle, profile, data) must be readable by
the service's group: ``install`` gives the group read access to the config file and to the
TLS files it names, and says so.
"""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import UserError
from toolkit.files import write_atomically

UNIT_NAME = "cpsl-agent.service"
USER = "cpsl-agent"
STATE_DIRECTORY = "cpsl-agent"
SYSUSERS_ENTRY = f'u {USER} - "cpsl-edge device agent" /var/lib/{STATE_DIRECTORY}\n'
SYSTEMCTL_TIMEOUT_S = 60

DEVICES_NONE = """\
PrivateDevices=yes
DevicePolicy=closed
PrivateUsers=yes
"""
# The GPU's device nodes, by device group (/proc/devices names, globbed by systemd): NVIDIA's
# driver on a PC registers nvidia, nvidia-frontend, nvidia-uvm, nvidia-caps; L4T's nvgpu,
# nvhost and host1x drivers on a Jetson; nvmap is a misc device there, so it goes by its path.
DEVICES_GPU = """\
PrivateDevices=no
DevicePolicy=closed
DeviceAllow=char-nvidia* rw
DeviceAllow=char-nv* rw
DeviceAllow=char-host1x* rw
DeviceAllow=/dev/nvmap rw
SupplementaryGroups=video render
"""
HARDENING = """\
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectClock=yes
ProtectHostname=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
KeyringMode=private
UMask=0077
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @mount @obsolete @debug @cpu-emulation @reboot @swap @raw-io @module
SystemCallErrorNumber=EPERM
"""


@dataclass(frozen=True)
class ServiceSpec:
    config: Path  # absolute path of the agent's TOML file
    python: Path  # the interpreter of the environment the agent is installed in
    gpu: bool = False  # the config lets the agent train on a GPU: the unit must reach its device nodes

    @classmethod
    def for_config(cls, config: Path) -> ServiceSpec:
        from toolkit.cli.connection import read_config_values

        path = config.expanduser().resolve()
        if not path.is_file():
            raise UserError(f"config file {config} does not exist")
        device = str(read_config_values(path).get("device", "cpu")).strip().lower()
        return cls(config=path, python=Path(sys.executable), gpu=device != "cpu")


def render_unit(spec: ServiceSpec) -> str:
    """The systemd unit that runs ``cpsl-agent --config`` as the service user."""
    for value in (str(spec.config), str(spec.python)):
        if any(c in value for c in "\n\"'\\%$ ") or not value.startswith("/"):
            raise UserError(f"{value!r} cannot be written into a unit: use an absolute path without spaces or quotes")
    return f"""\
# Written by `cpsl-agent service print`; see docs/deploy.md.
[Unit]
Description=cpsl-edge device agent (split-learning trainer)
Wants=network-online.target time-sync.target
After=network-online.target time-sync.target
StartLimitIntervalSec=300
StartLimitBurst=10

[Service]
Type=simple
User={USER}
Group={USER}
ExecStart={spec.python} -m firmware_agent --config {spec.config}
Restart=on-failure
RestartSec=5
TimeoutStopSec=30
StateDirectory={STATE_DIRECTORY}
StateDirectoryMode=0750
Environment=XDG_CACHE_HOME=%S/{STATE_DIRECTORY} PYTHONUNBUFFERED=1
WorkingDirectory=%S/{STATE_DIRECTORY}
{DEVICES_GPU if spec.gpu else DEVICES_NONE}{HARDENING}
[Install]
WantedBy=multi-user.target
"""


def install(spec: ServiceSpec, root: Path | None = None) -> list[str]:
    """Write the unit and the sysusers entry, make the user, enable (and, on a live system, start) it.

    ``root``: an image's root file system (e.g. a mounted SD card): everything is written
    there and enabled offline (``systemctl --root``), nothing is started.
    """
    prefix = root or Path("/")
    steps = []
    unit = prefix / "etc/systemd/system" / UNIT_NAME
    sysusers = prefix / "etc/sysusers.d" / f"{USER}.conf"
    for path, text in ((sysusers, SYSUSERS_ENTRY), (unit, render_unit(spec))):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, text)
        steps.append(f"wrote {path}")
    _run(["systemd-sysusers", *_root_flag(root), str(sysusers)])
    steps.append(f"system user {USER} ready")
    if root is None:
        steps += _share_with_service_group(spec.config)
        _run(["systemctl", "daemon-reload"])
        _run(["systemctl", "enable", "--now", UNIT_NAME])
        steps.append(f"enabled and started {UNIT_NAME}")
    else:
        _run(["systemctl", *_root_flag(root), "enable", UNIT_NAME])
        steps.append(f"enabled {UNIT_NAME} in {root} (starts at its next boot)")
    return steps


def uninstall(root: Path | None = None) -> list[str]:
    """Stop and disable the service and remove its unit; the user and the cached profile stay."""
    prefix = root or Path("/")
    unit = prefix / "etc/systemd/system" / UNIT_NAME
    if not unit.exists():
        raise UserError(f"{unit} does not exist: the service is not installed")
    if root is None:
        _run(["systemctl", "disable", "--now", UNIT_NAME])
    else:
        _run(["systemctl", *_root_flag(root), "disable", UNIT_NAME])
    unit.unlink()
    if root is None:
        _run(["systemctl", "daemon-reload"])
    return [f"disabled {UNIT_NAME}", f"removed {unit}", f"kept user {USER} and /var/lib/{STATE_DIRECTORY}"]


def status() -> int:
    """``systemctl status``'s own report, and its exit status (0: running)."""
    return _call(["systemctl", "status", "--no-pager", UNIT_NAME], capture=False).returncode


def _share_with_service_group(config: Path) -> list[str]:
    """Group read access for the service user to the config file and the TLS files it names."""
    from toolkit.cli.connection import PATH_KEYS, read_config_values
    from toolkit.transport.tls import BUNDLE_FILES

    group = grp.getgrnam(USER).gr_gid
    values = read_config_values(config)
    paths = [config] + [config.parent / str(values[k]) for k in PATH_KEYS if k in values]
    if "bundle" in values:
        paths += [config.parent / str(values["bundle"]) / name for name in BUNDLE_FILES]
    steps = []
    for path in paths:
        if path.exists():
            os.chown(path, -1, group)
            os.chmod(path, path.stat().st_mode | 0o040 | (0o010 if path.is_dir() else 0))
            steps.append(f"{path}: readable by group {USER}")
    return steps


def _root_flag(root: Path | None) -> list[str]:
    return [f"--root={root}"] if root is not None else []


def _call(command: list[str], capture: bool) -> subprocess.CompletedProcess:
    """Run a systemd tool, bounded in time; one line if it is missing or hangs."""
    if shutil.which(command[0]) is None:
        raise UserError(f"{command[0]} is not available: this system does not run systemd")
    try:
        return subprocess.run(command, capture_output=capture, text=True, timeout=SYSTEMCTL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"{' '.join(command)} did not finish within {SYSTEMCTL_TIMEOUT_S} s") from None


def _run(command: list[str]) -> None:
    done = _call(command, capture=True)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise UserError(f"{' '.join(command)} failed: {detail[-1] if detail else f'exit {done.returncode}'}")
