"""edge_server provision: files, modes, the ACL and CRL it writes, rotation and revocation, bad input."""

from __future__ import annotations

import stat
import time

import pytest
from cryptography import x509

from edge_server import provision
from firmware_agent.cli import build_parser
from tests.conftest import run_cli
from toolkit.cli.connection import apply_config_file, broker_from_args
from toolkit.errors import UserError


def _crl_serials(root) -> set[int]:
    crl = x509.load_pem_x509_crl((root / "crl.pem").read_bytes())
    return {entry.serial_number for entry in crl}


def _serial(folder) -> int:
    return x509.load_pem_x509_certificate((folder / "client.crt").read_bytes()).serial_number


def test_init_and_add_device_write_what_a_broker_and_a_board_need(tmp_path) -> None:
    deployment = provision.init(tmp_path / "pki", ["edge.local", "192.168.4.1"], 8883)
    folder = provision.add_device(deployment, "pi-kitchen")
    root = deployment.root
    for path in ("ca/ca.crt", "broker/broker.crt", "crl.pem", "acl", "mosquitto.conf", "server/client.crt"):
        assert (root / path).is_file(), path
    for key in (root / "ca/ca.key", root / "broker/broker.key", folder / "client.key", root / "server/client.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    broker = x509.load_pem_x509_certificate((root / "broker/broker.crt").read_bytes())
    names = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["edge.local"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["192.168.4.1"]
    device = x509.load_pem_x509_certificate((folder / "client.crt").read_bytes())
    assert device.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "pi-kitchen"
    config = (root / "mosquitto.conf").read_text()
    for line in ("allow_anonymous false", "require_certificate true", "use_identity_as_username true", "listener 8883"):
        assert line in config
    acl = (root / "acl").read_text()
    assert "topic write cpsl/v1/runs/+/devices/pi-kitchen/up" in acl
    assert "topic read cpsl/v1/runs/+/devices/pi-kitchen/down" in acl


def test_the_agent_toml_of_a_bundle_configures_the_agent(tmp_path) -> None:
    deployment = provision.init(tmp_path / "pki", ["edge.local"], 9000)
    folder = provision.add_device(deployment, "pi0")
    parser = build_parser()
    argv = ["--config", str(folder / "agent.toml"), "--data", "builtin:digits"]
    apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    assert (args.device_id, args.model) == ("pi0", ["lenet5"])
    broker = broker_from_args(args)
    assert broker.url == "mqtts://edge.local:9000" and broker.tls.key == folder / "client.key"


def test_renew_and_revoke_keep_every_old_certificate_on_the_crl(tmp_path) -> None:
    deployment = provision.init(tmp_path / "pki", ["127.0.0.1"], 8883)
    first = _serial(provision.add_device(deployment, "dev0"))
    provision.add_device(deployment, "dev1")
    second = _serial(provision.renew(deployment, "dev0"))
    assert first != second and _crl_serials(deployment.root) == {first}
    provision.revoke(deployment, "dev0")
    third = _serial(provision.add_device(deployment, "dev0"))  # back in the fleet with a new certificate
    assert _crl_serials(deployment.root) == {first, second}
    assert third not in _crl_serials(deployment.root)
    assert "user dev1" in (deployment.root / "acl").read_text()


def test_bad_provisioning_requests_are_one_line_errors(tmp_path) -> None:
    deployment = provision.init(tmp_path / "pki", ["127.0.0.1"], 8883)
    provision.add_device(deployment, "dev0")
    with pytest.raises(UserError, match="already holds a deployment"):
        provision.init(tmp_path / "pki", ["127.0.0.1"], 8883)
    with pytest.raises(UserError, match="already provisioned"):
        provision.add_device(deployment, "dev0")
    with pytest.raises(UserError, match="the edge server's identity"):
        provision.add_device(deployment, provision.SERVER_IDENTITY)
    with pytest.raises(UserError, match="device id"):
        provision.add_device(deployment, "a/b")
    with pytest.raises(UserError, match="not provisioned here"):
        provision.revoke(deployment, "ghost")


@pytest.mark.slow
def test_provision_cli(tmp_path) -> None:
    root = tmp_path / "pki"
    made = run_cli("edge_server", "provision", "init", "--out", str(root), "--server-host", "127.0.0.1,localhost")
    assert made.returncode == 0 and "mosquitto -c" in made.stdout, made.stderr
    added = run_cli("edge_server", "provision", "add-device", "dev0", "dev1", "--dir", str(root))
    assert added.returncode == 0 and (root / "devices/dev1/agent.toml").is_file(), added.stderr
    again = run_cli("edge_server", "provision", "init", "--out", str(root), "--server-host", "x")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already holds" in again.stderr
    missing = run_cli("edge_server", "provision", "revoke", "dev0", "--dir", str(tmp_path / "none"))
    assert missing.returncode == 2 and "holds no deployment" in missing.stderr
    revoked = run_cli("edge_server", "provision", "revoke", "dev0", "--dir", str(root))
    assert revoked.returncode == 0 and not (root / "devices/dev0").exists()


def test_the_generated_configuration_is_one_mosquitto_accepts(tmp_path) -> None:
    """Mosquitto exits at once on a setting it does not know; this one starts and listens."""
    from tests.brokers import free_port
    from toolkit.transport.mosquitto import MosquittoProcess, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    port = free_port()
    deployment = provision.init(tmp_path / "pki", ["127.0.0.1"], port, listen="127.0.0.1")
    with MosquittoProcess(deployment.root / "mosquitto.conf", port) as broker:
        time.sleep(0.3)
        assert broker.process.poll() is None
