"""TLS for the MQTT driver: the client's SSL context from provisioned files, and one-line diagnoses.

The context verifies the broker's certificate against the run's CA with hostname
checking on, offers TLS 1.2 and 1.3 only, and presents the device's (or the server's)
certificate. Problems that can be seen before connecting (a missing file, a key that
does not match its certificate, an expired certificate) are reported before connecting.
Problems only the broker can tell (a revoked certificate, another CA) arrive as TLS
alerts: :func:`diagnose` repeats the handshake once, capped at TLS 1.2 so that the
broker's verdict on our certificate arrives inside the handshake (TLS 1.3 sends it
after), and turns what it sees into one line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import UserError

BUNDLE_FILES = ("ca.crt", "client.crt", "client.key")


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path | None = None
    key: Path | None = None


def bundle_files(directory: Path) -> TlsFiles:
    """The files of a provisioned bundle (``edge_server provision``): DIR/ca.crt, client.crt, client.key."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"bundle {directory} is not a directory")
    ca, cert, key = (directory / name for name in BUNDLE_FILES)
    return TlsFiles(ca=ca, cert=cert, key=key)


def client_context(files: TlsFiles, max_tls12: bool = False) -> ssl.SSLContext:
    """An SSL context for a client of the broker; UserError names a bad file in one line."""
    for label, path in (("CA", files.ca), ("certificate", files.cert), ("key", files.key)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"TLS {label} file {path} does not exist")
    if (files.cert is None) != (files.key is None):
        raise UserError("give both a client certificate and its key (--cert and --key), or neither")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and its hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if max_tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(files.ca))
    except (ssl.SSLError, OSError) as exc:
        raise UserError(f"TLS CA file {files.ca} is not a readable PEM certificate ({_reason(exc)})") from None
    if files.cert is not None and files.key is not None:
        check_validity(files.cert)
        try:
            context.load_cert_chain(str(files.cert), str(files.key))
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
                raise UserError(f"TLS key {files.key} does not match certificate {files.cert}") from None
            raise UserError(
                f"TLS certificate {files.cert} or key {files.key} cannot be used ({_reason(exc)})"
            ) from None
        except OSError as exc:
            raise UserError(f"TLS certificate {files.cert} or key {files.key} cannot be read ({exc})") from None
    return context


def check_validity(cert_path: Path, now: dt.datetime | None = None) -> None:
    """UserError if the certificate at ``cert_path`` has expired or is not valid yet."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (ValueError, OSError) as exc:
        raise UserError(f"TLS certificate {cert_path} is not a readable PEM certificate ({exc})") from None
    now = now or dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise UserError(f"TLS certificate {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_before_utc > now:
        raise UserError(
            f"TLS certificate {cert_path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )


# OpenSSL's reasons (the text after the last ']' or the library's reason code) -> what they mean for us
_ALERTS = {
    "CERTIFICATE_REVOKED": "the broker refused our certificate: it has been revoked",
    "CERTIFICATE_EXPIRED": "the broker refused our certificate: it has expired",
    "CERTIFICATE_REQUIRED": "the broker requires a client certificate: give --cert and --key, or --bundle",
    "UNKNOWN_CA": "the broker does not know the CA that signed our certificate",
    "BAD_CERTIFICATE": "the broker refused our certificate",
    "HANDSHAKE_FAILURE": "the broker refused the TLS handshake (a client certificate is required, or no common cipher)",
    "WRONG_VERSION_NUMBER": "the broker does not speak TLS on this port: is it a plaintext (mqtt://) port?",
    "RECORD_LAYER_FAILURE": "the broker does not speak TLS on this port: is it a plaintext (mqtt://) port?",
    "PACKET_LENGTH_TOO_LONG": "the broker does not speak TLS on this port: is it a plaintext (mqtt://) port?",
}


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or str(exc).splitlines()[0][:200]


def describe_tls_error(exc: BaseException, host: str) -> str | None:
    """One line for a TLS failure, or None if ``exc`` is not about TLS (a refused TCP connection)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or ""
        if "Hostname mismatch" in message or "IP address mismatch" in message:
            return f"the broker's certificate is not valid for {host!r} (hostname verification failed)"
        if "expired" in message:
            return "the broker's certificate has expired"
        return f"the broker's certificate is not signed by our CA ({message or 'verification failed'})"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError | BrokenPipeError):
        return "the broker closed the connection during the TLS handshake: is this its TLS (mqtts) port?"
    if isinstance(exc, ssl.SSLError):
        text = f"{getattr(exc, 'reason', '')} {exc}".upper()
        for code, meaning in _ALERTS.items():
            if code in text:
                return meaning
        return f"TLS failed: {_reason(exc)}"
    return None


def diagnose(host: str, port: int, files: TlsFiles, timeout_s: float = 5.0) -> str | None:
    """Why a TLS connection to host:port fails, in one line; None if TLS itself works (or TCP fails)."""
    context = client_context(files, max_tls12=True)
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.settimeout(min(1.0, timeout_s))
            with contextlib.suppress(TimeoutError):  # a broker that dislikes our certificate says so at once
                tls.recv(1)
            return None
    except OSError as exc:
        return describe_tls_error(exc, host)
