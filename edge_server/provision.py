"""``edge_server provision``: a deployment's CA, the broker's and the server's certificates, one
bundle per device, Mosquitto's configuration and ACL, and revocation.

Layout of DIR (everything a later ``add-device`` or ``revoke`` needs is read back from it)::

    provision.json           settings and every issued device certificate (serial, expiry, revoked)
    ca/ca.crt  ca/ca.key     the deployment's CA (the key never leaves this machine: keep DIR safe)
    broker/broker.crt .key   the broker's certificate, with the server's host names and addresses
    crl.pem                  revoked certificates; Mosquitto reads it (crlfile)
    acl                      per-identity topic rules; Mosquitto reads it (acl_file)
    mosquitto.conf           `mosquitto -c DIR/mosquitto.conf` runs it as it is
    server/                  the edge server's bundle: ca.crt, client.crt, client.key
    devices/ID/              a device's bundle: ca.crt, client.crt, client.key (0600), agent.toml

Identity is the certificate: Mosquitto requires a client certificate signed by the CA
(``require_certificate``), takes its common name as the MQTT user
(``use_identity_as_username``), and the ACL lets each identity touch only its own topics.
Every file is written atomically (temporary file, then rename); keys with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from edge_server import pki
from toolkit.errors import UserError
from toolkit.files import write_atomically
from toolkit.protocol import topics
from toolkit.protocol.topics import check_id

SERVER_IDENTITY = "cpsl-edge-server"  # the edge server's certificate CN; no device may take it
STATE_FILE = "provision.json"
STATE_VERSION = 1


@dataclass
class Deployment:
    root: Path
    state: dict

    @property
    def port(self) -> int:
        return int(self.state["port"])

    @property
    def server_hosts(self) -> list[str]:
        return list(self.state["server_hosts"])

    def ca(self) -> pki.Issued:
        return pki.load_issued((self.root / "ca/ca.crt").read_bytes(), (self.root / "ca/ca.key").read_bytes())

    def device_bundle(self, device: str) -> Path:
        return self.root / "devices" / device

    @property
    def server_bundle(self) -> Path:
        return self.root / "server"


def _write_issued(folder: Path, issued: pki.Issued, ca: pki.Issued, cert_name: str, key_name: str) -> None:
    write_atomically(folder / "ca.crt", ca.cert_pem())
    write_atomically(folder / cert_name, issued.cert_pem())
    write_atomically(folder / key_name, issued.key_pem(), 0o600)


def init(
    root: Path, server_hosts: list[str], port: int = 8883, days: int = pki.LEAF_DAYS, listen: str | None = None
) -> Deployment:
    """A new deployment in ``root`` (which must not hold one already)."""
    if not server_hosts or any(not host.strip() for host in server_hosts):
        raise UserError("--server-host needs at least one host name or address")
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port")
    if (root / STATE_FILE).exists():
        raise UserError(f"{root} already holds a deployment ({STATE_FILE}); use add-device or revoke")
    root.mkdir(parents=True, exist_ok=True)
    ca = pki.make_ca()
    write_atomically(root / "ca/ca.crt", ca.cert_pem())
    write_atomically(root / "ca/ca.key", ca.key_pem(), 0o600)
    broker = pki.issue(ca, server_hosts[0], server_hosts=server_hosts, days=days)
    write_atomically(root / "broker/broker.crt", broker.cert_pem())
    write_atomically(root / "broker/broker.key", broker.key_pem(), 0o600)
    server = pki.issue(ca, SERVER_IDENTITY, days=days)
    _write_issued(root / "server", server, ca, "client.crt", "client.key")
    deployment = Deployment(
        root.resolve(),
        {
            "version": STATE_VERSION,
            "server_hosts": server_hosts,
            "port": port,
            "listen": listen,
            "days": days,
            "devices": {},
            "revoked": [],  # every certificate ever revoked: serial, device, when (the CRL is made from it)
        },
    )
    _save(deployment)
    return deployment


def load(root: Path) -> Deployment:
    path = root / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{root} holds no deployment: run edge_server provision init --out {root} first") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read: {exc}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise UserError(f"{path} is not a provisioning state of version {STATE_VERSION}")
    return Deployment(root.resolve(), state)


def add_device(
    deployment: Deployment,
    device: str,
    days: int | None = None,
    broker_host: str | None = None,
    data: str | None = None,
) -> Path:
    """Issue ``device`` its certificate and write its bundle; returns the bundle folder."""
    check_id(device, "device id")
    if device == SERVER_IDENTITY:
        raise UserError(f"device id {device!r} is the edge server's identity")
    if device in deployment.state["devices"]:
        raise UserError(f"device {device} is already provisioned; `renew` gives it a new certificate")
    _issue_device(deployment, device, days, broker_host, data)
    _save(deployment)
    return deployment.device_bundle(device)


def renew(deployment: Deployment, identity: str, days: int | None = None, broker_host: str | None = None) -> Path:
    """A new key and certificate for a device (its old certificate revoked), the server or the broker.

    This is rotation: copy the new bundle to the board (or restart the server / reload the
    broker with the new files); a device's old certificate stops working at the broker's next reload.
    """
    days = days or int(deployment.state["days"])
    ca = deployment.ca()
    if identity == "broker":
        issued = pki.issue(ca, deployment.server_hosts[0], server_hosts=deployment.server_hosts, days=days)
        write_atomically(deployment.root / "broker/broker.crt", issued.cert_pem())
        write_atomically(deployment.root / "broker/broker.key", issued.key_pem(), 0o600)
        return deployment.root / "broker"
    if identity == "server":
        _write_issued(
            deployment.server_bundle, pki.issue(ca, SERVER_IDENTITY, days=days), ca, "client.crt", "client.key"
        )
        return deployment.server_bundle
    if identity not in deployment.state["devices"]:
        raise UserError(f"device {identity} was never provisioned here (add-device)")
    data = deployment.state["devices"][identity].get("data")  # the new agent.toml keeps it
    _revoke_entry(deployment, identity)
    _issue_device(deployment, identity, days, broker_host, data)
    _save(deployment)
    return deployment.device_bundle(identity)


def _issue_device(
    deployment: Deployment, device: str, days: int | None, broker_host: str | None, data: str | None = None
) -> None:
    ca = deployment.ca()
    issued = pki.issue(ca, device, days=days or int(deployment.state["days"]))
    folder = deployment.device_bundle(device)
    if folder.exists():
        shutil.rmtree(folder)  # the old bundle (key included) must not linger beside the new one
    _write_issued(folder, issued, ca, "client.crt", "client.key")
    host = broker_host or deployment.server_hosts[0]
    write_atomically(folder / "agent.toml", agent_config(device, f"mqtts://{host}:{deployment.port}", data).encode())
    deployment.state["devices"][device] = {
        "serial": format(issued.cert.serial_number, "x"),
        "not_after": issued.cert.not_valid_after_utc.isoformat(),
        **({"data": data} if data else {}),
    }


def revoke(deployment: Deployment, device: str) -> None:
    """Take ``device`` out: its certificate goes on the CRL and its ACL entries go; the others are untouched."""
    if device not in deployment.state["devices"]:
        raise UserError(f"device {device} is not provisioned here (never added, or already revoked)")
    _revoke_entry(deployment, device)
    _save(deployment)
    folder = deployment.device_bundle(device)
    if folder.is_dir():
        shutil.rmtree(folder)


def _revoke_entry(deployment: Deployment, device: str) -> None:
    entry = deployment.state["devices"].pop(device)
    revoked_at = dt.datetime.now(dt.timezone.utc).isoformat()
    deployment.state["revoked"].append({"device": device, "serial": entry["serial"], "revoked_at": revoked_at})


def _save(deployment: Deployment) -> None:
    """provision.json, and everything derived from it: the CRL, the ACL and mosquitto.conf."""
    root = deployment.root
    write_atomically(root / STATE_FILE, (json.dumps(deployment.state, indent=2) + "\n").encode(), 0o600)
    revoked = [
        (int(entry["serial"], 16), dt.datetime.fromisoformat(entry["revoked_at"]))
        for entry in deployment.state["revoked"]
    ]
    crl = pki.make_crl(deployment.ca(), revoked)
    write_atomically(root / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))
    write_atomically(root / "acl", acl_text(sorted(deployment.state["devices"])).encode())
    write_atomically(
        root / "mosquitto.conf", mosquitto_conf(root, deployment.port, deployment.state.get("listen")).encode()
    )


def acl_text(devices: list[str]) -> str:
    """Mosquitto ACL: the server may use the whole tree; each device only its own topics.

    A device publishes only its registration/will, heartbeats, uploads and inference requests,
    under its own id, and reads only what is addressed to it and the server's broadcasts
    (inference services' status included). Explicit
    ``user`` blocks rather than one ``pattern`` with %u: a revoked device loses its rules
    at once (on the broker's next reload), even before its certificate is refused.
    """
    root = topics.ROOT
    lines = [
        "# Written by edge_server provision; regenerated by add-device and revoke. Do not edit by hand.",
        "# Users are certificate common names (use_identity_as_username).",
        "",
        f"user {SERVER_IDENTITY}",
        f"topic readwrite {root}/#",
    ]
    for device in devices:
        lines += [
            "",
            f"user {device}",
            f"topic write {topics.device_status(device)}",
            f"topic write {topics.device_heartbeat(device)}",
            f"topic write {topics.up('+', device)}",
            f"topic read {topics.all_down_for(device)}",
            f"topic read {topics.server_status()}",
            f"topic read {topics.run_metrics('+')}",
            f"topic write {topics.infer_request('+', device)}",
            f"topic read {topics.infer_reply('+', device)}",
            f"topic read {topics.infer_status('+')}",
        ]
    return "\n".join(lines) + "\n"


def mosquitto_conf(root: Path, port: int, listen: str | None = None) -> str:
    # Mosquitto started as root drops to the user named here before it reads certificates;
    # we name the user who provisioned (who can read the keys). See docs/security.md.
    user = getpass.getuser()
    return f"""# Written by edge_server provision: `mosquitto -c {root}/mosquitto.conf`.
# One TLS listener, nothing else: no anonymous clients, a CA-signed client certificate
# required, its common name is the MQTT user, and the ACL says what each user may touch.
# After add-device, renew or revoke: `kill -HUP <pid>` reloads the ACL and the CRL.
per_listener_settings false
allow_anonymous false
acl_file {root}/acl
persistence false
user {user}
# Nagle off towards clients: under TLS a frame leaves in several records, and with Nagle on the
# last one waits for the client's delayed ACK (measured: -10% smashed-data throughput at 20 Mbit/s).
set_tcp_nodelay true
# cpsl frames travel in chunks of at most 1 MiB (a retained registration with its profile is
# smaller still): anything far larger is not ours, and the broker drops the client that sends it.
max_packet_size 8388608

listener {port}{" " + listen if listen else ""}
cafile {root}/ca/ca.crt
certfile {root}/broker/broker.crt
keyfile {root}/broker/broker.key
crlfile {root}/crl.pem
require_certificate true
use_identity_as_username true
"""


def agent_config(device: str, broker_url: str, data: str | None = None, bundle: bool = True) -> str:
    """The device's agent.toml; ``data`` left as a comment to fill in when not given."""
    for value in (broker_url, data or ""):
        if any(c in value for c in '"\\\n\r'):
            raise UserError(f"{value!r} cannot go into agent.toml (quotes, backslashes or newlines)")
    data_line = f'data = "{data}"' if data else '# data = "folder:/srv/cpsl-data"   (required: set it for each board)'
    return f"""# cpsl-agent configuration for {device}, written by edge_server provision.
# Copy this folder to the board (e.g. /etc/cpsl-edge/) and run: cpsl-agent --config agent.toml
# Relative paths are relative to this file. Any key is also a command-line flag (--data, ...).
broker = "{broker_url}"
device-id = "{device}"
{'bundle = "."' if bundle else "# no TLS: a plain broker on a trusted network (docs/security.md)"}
# The models this device may train (built-in names, or your own file.py:function):
# nothing the network sends can make it build anything else.
model = ["lenet5"]
# Where its data is (folder:DIR, idx:DIR, builtin:NAME), and which share of it:
{data_line}
# partition = "0/1"
# Where it trains: cpu (default), or cuda on a Jetson with NVIDIA's torch (docs/deploy.md):
# device = "cuda"
"""


def standalone_device(root: Path, device: str, broker_url: str, data: str | None = None) -> Path:
    """A device folder with only agent.toml, for a plain broker (no deployment, no certificates)."""
    check_id(device, "device id")
    if not broker_url.startswith("mqtt://"):
        raise UserError(f"--broker {broker_url}: without a deployment only a plain mqtt:// broker can be named")
    folder = root / "devices" / device
    write_atomically(folder / "agent.toml", agent_config(device, broker_url, data, bundle=False).encode(), 0o600)
    return folder
