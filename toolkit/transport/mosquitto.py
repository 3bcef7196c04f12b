"""A Mosquitto broker as a child process: for the secure demo and the tests (plain or TLS)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from toolkit.errors import UserError


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (str(p) for p in (Path("/usr/sbin/mosquitto"), Path("/usr/local/sbin/mosquitto")) if p.exists()), None
    )


def wait_for_port(port: int, host: str = "127.0.0.1", timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:g} s")


class MosquittoProcess:
    """``mosquitto -c CONFIG`` until :meth:`stop`; :meth:`reload` sends SIGHUP (ACL, CRL, certificates)."""

    def __init__(self, config: Path, port: int, host: str = "127.0.0.1") -> None:
        self.config, self.port, self.host = Path(config), port, host
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> MosquittoProcess:
        binary = mosquitto_binary()
        if binary is None:
            raise UserError("mosquitto is not installed (apt-get install mosquitto), and this needs it")
        self.process = subprocess.Popen(
            [binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_for_port(self.port, self.host, timeout_s)
        except TimeoutError:
            self.stop()
            error = self.process.stderr.read().decode(errors="replace").strip().splitlines() if self.process else []
            raise UserError(
                f"mosquitto did not start with {self.config}: {error[-1] if error else 'no output'}"
            ) from None
        return self

    def reload(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(1)  # SIGHUP

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self, down_s: float = 1.0, kill: bool = False) -> None:
        """Stop the broker (SIGTERM; SIGKILL with ``kill``, so it cannot save its persistence on
        the way down), wait ``down_s``, start it again on the same config: a broker restart."""
        if kill and self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        else:
            self.stop()
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
