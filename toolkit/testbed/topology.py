"""An access point and N devices on one Linux host: network namespaces, shaped links, CPU quotas.

    cpsl-d0 ──d0═╗                       (d_i egress: device i's uplink cap,
    cpsl-d1 ──d1═╬══ br0 (cpsl-sw) ══ap0s══ap0── cpsl-ap   d_i-s egress: its downlink cap)
    ...        ══╝                       (ap0s egress: the shared uplink medium,
                                          ap0 egress: the shared downlink medium)

- every device has its own namespace ``cpsl-d<i>`` with a veth into a bridge in the
  switch namespace ``cpsl-sw``; the access point's namespace ``cpsl-ap`` (broker and edge
  server) hangs off the same bridge through one veth: that veth is the shared medium,
  shaped with tbf in both directions;
- each device's veth is shaped too (both ends: tbf shapes egress only), to its own rate
  cap -- its channel quality;
- each device's processes run in a cgroup v1 CPU group ``cpsl-d<i>`` with a CFS quota --
  its compute class.

That is the ``wired`` medium: tbf shares bytes (each device capped, the medium's capacity
shared, concurrent transfers overlapping). The ``wifi`` medium shares airtime instead: no
tbf at all, and every device's traffic to the broker crosses a user-space relay in the
access point's namespace (``toolkit/testbed/wifi.py``) that gives backlogged devices equal
transmit opportunities at their own PHY rates (their uplink and downlink rates), one frame
at a time -- the 802.11 rule, performance anomaly included.

Everything created is recorded as it is created and removed by :meth:`Testbed.destroy`,
which is idempotent and tolerates half-built state; :func:`remove_leftovers` clears
anything named ``cpsl-*`` that an earlier killed run left behind. Needs root.

``cpsl`` is the default *instance* name. Another (``CPSL_TESTBED_INSTANCE=bench``, or
``cpsl-testbed --instance bench``) builds ``bench-ap``, ``bench-d0``, ... beside it: the
veths are created straight inside their namespaces, so two testbeds share no name, and a
test suite can run beside a long benchmark. Each instance refuses to start over its own
leftovers and cleans up only its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.errors import UserError
from toolkit.testbed.airtime import CONTENTION_MODES

log = logging.getLogger("cpsl.testbed")

INSTANCE_ENV = "CPSL_TESTBED_INSTANCE"
DEFAULT_INSTANCE = "cpsl"
_INSTANCE_NAME = re.compile(r"[a-z][a-z0-9]{0,11}")
SUBNET = "10.77.0"
AP_ADDRESS = f"{SUBNET}.1"
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
MEDIA = ("wired", "wifi")
CFS_PERIOD_US = 20_000  # short periods: a slow device, not one that stops for 90 ms at a time (quota >= 1 ms)


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    uplink_mbit: float
    downlink_mbit: float
    cpu_share: float  # fraction of one core (CFS quota / period)

    def __post_init__(self) -> None:
        if not (self.uplink_mbit > 0 and self.downlink_mbit > 0):
            raise UserError(f"device {self.name}: link rates must be positive")
        if not 0.05 <= self.cpu_share <= 64:
            raise UserError(f"device {self.name}: cpu share must be between 0.05 and 64 cores")


@dataclass(frozen=True)
class TestbedSpec:
    devices: tuple[DeviceSpec, ...]
    medium_up_mbit: float = 20.0  # the shared uplink medium (wired: tbf capacity)
    medium_down_mbit: float = 20.0
    medium: str = "wired"  # "wired": tbf shares bytes; "wifi": the airtime relay shares time
    # wifi only: "dcf", stations that send at once contend (backoff, collisions); "none", they take turns
    contention: str = "dcf"

    def __post_init__(self) -> None:
        if not 1 <= len(self.devices) <= 200:
            raise UserError("a testbed has 1 to 200 devices")
        if self.medium not in MEDIA:
            raise UserError(f"medium {self.medium!r}: choose one of {', '.join(MEDIA)}")
        if self.contention not in CONTENTION_MODES:
            raise UserError(f"contention {self.contention!r}: choose one of {', '.join(CONTENTION_MODES)}")
        if not (self.medium_up_mbit > 0 and self.medium_down_mbit > 0):
            raise UserError("medium rates must be positive")


def instance_prefix(instance: str | None = None) -> str:
    """The prefix of every namespace and cgroup of one testbed instance: ``instance`` or the
    ``CPSL_TESTBED_INSTANCE`` environment variable or ``cpsl``, then a dash."""
    name = instance if instance is not None else os.environ.get(INSTANCE_ENV, DEFAULT_INSTANCE)
    if not _INSTANCE_NAME.fullmatch(name):
        raise UserError(f"testbed instance {name!r}: 1-12 lowercase letters and digits, starting with a letter")
    return f"{name}-"


def require_root() -> None:
    if os.geteuid() != 0:
        raise UserError("the testbed creates network namespaces, tc shapers and cgroups: run it as root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise UserError(f"the testbed needs `{tool}` (iproute2), which is not installed")
    if not CGROUP_CPU.is_dir():
        raise UserError(f"the testbed needs the cgroup v1 cpu controller at {CGROUP_CPU}")


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(command), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def _tbf(namespace: str, interface: str, mbit: float, change: bool = False) -> None:
    rate_bit = int(mbit * 1e6)
    burst = max(16 * 1024, rate_bit // 8 // 100)  # 10 ms at the rate, at least 16 KiB
    verb = "change" if change else "add"
    _run(
        "ip",
        "netns",
        "exec",
        namespace,
        "tc",
        "qdisc",
        verb,
        "dev",
        interface,
        "root",
        "tbf",
        "rate",
        f"{rate_bit}bit",
        "burst",
        str(burst),
        "latency",
        "2s",
    )


@dataclass
class Testbed:
    spec: TestbedSpec
    prefix: str = field(default_factory=instance_prefix)
    namespaces: list[str] = field(default_factory=list)
    cgroups: list[Path] = field(default_factory=list)

    @property
    def ap_namespace(self) -> str:
        return f"{self.prefix}ap"

    @property
    def switch_namespace(self) -> str:
        return f"{self.prefix}sw"

    def device_namespace(self, index: int) -> str:
        return f"{self.prefix}d{index}"

    @staticmethod
    def device_address(index: int) -> str:
        return f"{SUBNET}.{10 + index}"

    def _namespace(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        _run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")

    def _veth(self, inside_ns: str, inside: str, switch_side: str, address: str) -> None:
        # both ends are born in their namespaces: no name in the host's, where another instance's could clash
        switch = self.switch_namespace
        _run(
            "ip",
            "link",
            "add",
            inside,
            "netns",
            inside_ns,
            "type",
            "veth",
            "peer",
            "name",
            switch_side,
            "netns",
            switch,
        )
        _run("ip", "netns", "exec", inside_ns, "ip", "addr", "add", f"{address}/24", "dev", inside)
        _run("ip", "netns", "exec", inside_ns, "ip", "link", "set", inside, "up")
        _run("ip", "netns", "exec", switch, "ip", "link", "set", switch_side, "master", "br0")
        _run("ip", "netns", "exec", switch, "ip", "link", "set", switch_side, "up")

    def create(self) -> None:
        """Build it all; on any failure, remove what was built and re-raise."""
        require_root()
        namespaces, groups = leftovers(self.prefix)
        if namespaces or groups:
            instance = self.prefix.removesuffix("-")
            flag = "" if instance == DEFAULT_INSTANCE else f" --instance {instance}"
            raise UserError(
                f"testbed state exists already ({', '.join(namespaces + [g.name for g in groups])}): another testbed "
                f"is running, or a killed one left it; `cpsl-testbed cleanup{flag}` removes it, and "
                "`--instance NAME` runs a second testbed beside it"
            )
        switch, ap = self.switch_namespace, self.ap_namespace
        try:
            self._namespace(switch)
            _run("ip", "netns", "exec", switch, "ip", "link", "add", "br0", "type", "bridge")
            _run("ip", "netns", "exec", switch, "ip", "link", "set", "br0", "up")
            self._namespace(ap)
            self._veth(ap, "ap0", "ap0s", AP_ADDRESS)
            wired = self.spec.medium == "wired"  # the wifi relay shapes by airtime; tbf would share bytes
            if wired:
                _tbf(switch, "ap0s", self.spec.medium_up_mbit)  # devices -> access point
                _tbf(ap, "ap0", self.spec.medium_down_mbit)  # access point -> devices
            for index, device in enumerate(self.spec.devices):
                namespace = self.device_namespace(index)
                self._namespace(namespace)
                self._veth(namespace, f"d{index}", f"d{index}s", self.device_address(index))
                if wired:
                    _tbf(namespace, f"d{index}", device.uplink_mbit)
                    _tbf(switch, f"d{index}s", device.downlink_mbit)
                group = CGROUP_CPU / namespace
                group.mkdir(exist_ok=True)
                self.cgroups.append(group)
                (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(int(device.cpu_share * CFS_PERIOD_US)))
        except BaseException:
            self.destroy()
            raise

    def set_uplink(self, index: int, mbit: float) -> None:
        """Change a device's uplink cap while it runs (a link that slows mid-run); wired medium only."""
        if self.spec.medium != "wired":
            raise UserError("changing a link mid-run needs --medium wired (the wifi relay's rates are fixed per run)")
        _tbf(self.device_namespace(index), f"d{index}", mbit, change=True)

    def set_link(self, index: int, up: bool) -> None:
        """Take a device's link down or bring it back (a Wi-Fi drop-out, a pulled cable): its
        connections stay open and TCP retransmits what was in flight once it is back."""
        namespace = self.device_namespace(index)
        _run("ip", "netns", "exec", namespace, "ip", "link", "set", f"d{index}", "up" if up else "down")

    def set_cpu(self, index: int, cpu_share: float) -> None:
        (self._cpu_group(index) / "cpu.cfs_quota_us").write_text(str(int(cpu_share * CFS_PERIOD_US)))

    def _cpu_group(self, index: int) -> Path:
        return CGROUP_CPU / self.device_namespace(index)

    def device_command(self, index: int, command: list[str], throttled: bool = True) -> list[str]:
        """``command`` run in device ``index``'s namespace and (``throttled``) CPU group; an
        unthrottled one keeps its PID through ``ip netns exec`` and joins the group later
        (:meth:`throttle`)."""
        if not throttled:
            return ["ip", "netns", "exec", self.device_namespace(index), *command]
        group = self._cpu_group(index) / "cgroup.procs"
        inner = " ".join(_quote(part) for part in command)
        return ["sh", "-c", f"echo $$ > {group} && exec ip netns exec {self.device_namespace(index)} {inner}"]

    def throttle(self, index: int, pid: int) -> None:
        """Move process ``pid`` (all its threads) into device ``index``'s CPU group."""
        (self._cpu_group(index) / "cgroup.procs").write_text(str(pid))

    def wifi_stations(self) -> list[str]:
        """The relay's ``--station`` values: each device's address, name and PHY rates."""
        return [
            f"{self.device_address(i)}={device.name}:{device.uplink_mbit:g}:{device.downlink_mbit:g}"
            for i, device in enumerate(self.spec.devices)
        ]

    def ap_command(self, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ap_namespace, *command]

    def destroy(self) -> None:
        """Remove every namespace and cgroup made (veths and qdiscs go with their namespaces)."""
        for group in reversed(self.cgroups):
            _remove_cgroup(group)
        self.cgroups.clear()
        for namespace in reversed(self.namespaces):
            _kill_namespace_processes(namespace)
            _run("ip", "netns", "delete", namespace, check=False)
        self.namespaces.clear()


def _quote(part: str) -> str:
    import shlex

    return shlex.quote(part)


def _kill_namespace_processes(namespace: str) -> None:
    result = _run("ip", "netns", "pids", namespace, check=False)
    for pid in result.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(pid), 9)


def _remove_cgroup(group: Path) -> None:
    procs = group / "cgroup.procs"
    if procs.exists():
        for pid in procs.read_text().split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
    try:
        group.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:  # processes still exiting: one retry after they are reaped
        import time

        time.sleep(0.5)
        try:
            group.rmdir()
        except OSError:
            log.warning("could not remove cgroup %s: %s", group, exc)


def leftovers(prefix: str | None = None) -> tuple[list[str], list[Path]]:
    """One instance's namespaces and CPU cgroups (by default the instance the environment names)."""
    prefix = prefix or instance_prefix()
    namespaces = [
        line.split()[0]
        for line in _run("ip", "netns", "list", check=False).stdout.splitlines()
        if line.startswith(prefix)
    ]
    groups = sorted(CGROUP_CPU.glob(f"{prefix}*")) if CGROUP_CPU.is_dir() else []
    return namespaces, groups


def remove_leftovers(prefix: str | None = None) -> tuple[int, int]:
    """Remove one instance's namespaces and CPU cgroups (what a killed run may leave): ``cpsl-*``
    by default; another instance's are left alone."""
    require_root()
    namespaces, groups = leftovers(prefix)
    for group in groups:
        _remove_cgroup(group)
    for namespace in namespaces:
        _kill_namespace_processes(namespace)
        _run("ip", "netns", "delete", namespace, check=False)
    return len(namespaces), len(groups)
