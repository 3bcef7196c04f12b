"""An MQTT broker inside this process (amqtt), for the demo and for machines without Mosquitto.

amqtt speaks MQTT 3.1.1 only and is about 4x slower than Mosquitto; its defaults
listen on 0.0.0.0:1883 and load $SYS and packet-logging plugins, so this wrapper binds
a loopback port explicitly and loads only anonymous authentication.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

from toolkit.errors import UserError
from toolkit.transport.base import BrokerAddress


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EmbeddedBroker:
    def __init__(self, port: int | None = None) -> None:
        self.address = BrokerAddress("127.0.0.1", port or free_loopback_port())
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, name="embedded-broker", daemon=True)

    def _serve(self) -> None:
        from amqtt.broker import Broker

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            broker = Broker(
                {
                    "listeners": {"default": {"type": "tcp", "bind": f"{self.address.host}:{self.address.port}"}},
                    "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
                }
            )
            await broker.start()
            self._ready.set()
            stop = asyncio.Event()
            self._stop_event = stop
            await stop.wait()
            await broker.shutdown()

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to start()'s caller
            self._error = exc
            self._ready.set()
        finally:
            self._stopped.set()

    def start(self, timeout_s: float = 10.0) -> BrokerAddress:
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error is not None:
            raise UserError(f"the embedded broker did not start on {self.address.url}: {self._error or 'timeout'}")
        return self.address

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._loop is not None and not self._stopped.is_set():
            self._loop.call_soon_threadsafe(self._stop_event.set)
            self._stopped.wait(timeout_s)

    def __enter__(self) -> BrokerAddress:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
