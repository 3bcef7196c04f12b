"""First boot ("flashing"): a cloud-init user-data file that turns a fresh SD card into a registered device.

Raspberry Pi OS images since the Trixie-based release of October 2025 run cloud-init on
first boot from the ``user-data`` file on the boot partition (bookworm images used
Imager's firstrun.sh instead: install by hand there, docs/deploy.md); Ubuntu Server for
Raspberry Pi and most arm64 board images do too. On first boot the board:

1. gets its host name, and Python with venv and pip from its distribution;
2. gets ``/etc/cpsl-edge/``: ``agent.toml`` and, with TLS, the device's bundle (CA,
   certificate, private key) exactly as ``edge_server provision add-device`` wrote them;
3. makes a virtual environment in ``/opt/cpsl-edge``, installs torch (the CPU build from
   PyTorch's index by default: PyPI's current aarch64 torch is a CUDA build of several GB)
   and then the agent's install profile, ``cpsl-edge[agent]``;
4. installs and starts the hardened service (``cpsl-agent service install``), which
   registers with the edge server as soon as the broker answers.

The file holds the device's private key: treat it (and the SD card's boot partition) as
you treat the key. The YAML is written by hand with block literals, so that a person can
read and edit it; ``cloud-init schema`` validates it (tests/test_first_boot.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import UserError

CONFIG_DIR = "/etc/cpsl-edge"
VENV = "/opt/cpsl-edge"
DEFAULT_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
BUNDLE_MODES = {"ca.crt": "0644", "client.crt": "0644", "client.key": "0600"}


@dataclass(frozen=True)
class Install:
    """What the board installs: torch (and from which index), then the agent."""

    torch: str = "torch"
    torch_index: str | None = DEFAULT_TORCH_INDEX
    agent: str = "cpsl-edge[agent]"

    def __post_init__(self) -> None:
        for name, value in (("torch", self.torch), ("agent package", self.agent), ("torch index", self.torch_index)):
            if value is not None and (not value.strip() or any(c in value for c in "\n\r\"'`$\\")):
                raise UserError(f"the {name} {value!r} cannot go into a first-boot file (quotes, $ or newlines)")


def user_data(device: str, folder: Path, install: Install) -> str:
    """The cloud-config for ``device`` from its provisioned folder (agent.toml, and its bundle if any)."""
    config = folder / "agent.toml"
    if not config.is_file():
        raise UserError(f"{config} does not exist: provision the device first")
    files = [("agent.toml", config.read_text(), "0600")]
    for name, mode in BUNDLE_MODES.items():
        if (folder / name).is_file():
            files.append((name, (folder / name).read_text(), mode))
    pip = f"{VENV}/bin/pip"
    torch = [pip, "install", *(["--index-url", install.torch_index] if install.torch_index else []), install.torch]
    commands = [
        ["python3", "-m", "venv", VENV],
        [pip, "install", "--upgrade", "pip"],
        torch,
        [pip, "install", install.agent],
        [f"{VENV}/bin/cpsl-agent", "service", "install", "--config", f"{CONFIG_DIR}/agent.toml"],
    ]
    lines = [
        "#cloud-config",
        f"# First boot of cpsl-edge device {device}: written by `edge_server provision add-device --cloud-init`.",
        "# It holds the device's private key when the deployment uses TLS: keep it as you keep the key.",
        "# Put it on the boot partition as user-data (Raspberry Pi Imager: edit settings, or copy it there).",
        f"hostname: {device}",
        "package_update: true",
        "packages:",
        "  - python3",
        "  - python3-venv",
        "  - python3-pip",
        "write_files:",
    ]
    for name, text, mode in files:
        lines += [
            f"  - path: {CONFIG_DIR}/{name}",
            "    owner: root:root",
            f'    permissions: "{mode}"',
            "    content: |",
            *[f"      {line}" if line else "" for line in text.rstrip("\n").splitlines()],
        ]
    lines.append("runcmd:")
    lines += ["  - [" + ", ".join(_quoted(part) for part in command) + "]" for command in commands]
    lines += [
        "final_message: cpsl-agent installed and started after $UPTIME s; journalctl -u cpsl-agent shows it",
        "",
    ]
    return "\n".join(lines)


def _quoted(text: str) -> str:
    return '"' + text + '"'
