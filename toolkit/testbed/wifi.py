"""A Wi-Fi medium in user space: a TCP relay in the access point's namespace that all device traffic crosses.

Devices connect to the relay (the broker's address as they know it); the relay connects on
to the real broker and carries the bytes both ways, but only as the shared medium allows:
every chunk of a flow becomes frames of at most ``frame_bytes``, the backlogged contenders
(each device's uplink, and the access point for all downlinks) take turns one frame each,
and a frame holds the medium for its airtime (``toolkit.testbed.airtime``) before it is
delivered. Transmissions never overlap, so n saturated stations each get about
1/sum_j(1/r_j) of the medium's time: the 802.11 performance anomaly, which tbf (bytes, not
time) cannot produce. The real MQTT/TCP traffic of the real processes crosses it.

Who transmits next is decided as 802.11's DCF decides it (``--contention dcf``, the
default): every contender counts down a random backoff, two that reach zero together
collide, lose the air time of their frames and double their windows, so stations that
send at once pay for it (Bianchi 2000; ``toolkit.testbed.airtime.DcfScheduler``).
``--contention none`` has them take polite turns instead, one frame each, each frame
charged the mean backoff of a lone station: the contention-free medium.

TCP is terminated on both sides of the relay, so TCP's own acknowledgements do not take
airtime here; the per-frame overhead stands for the MAC-level ACK.
Each flow's queue is bounded (``queue_bytes``): a sender faster than its share is held
back by TCP flow control, as a station's full transmit queue holds back its applications.

    python -m toolkit.testbed.wifi --listen 10.77.0.1:1883 --target 127.0.0.1:1884 \\
        --station 10.77.0.10=dev0:24:24 --station 10.77.0.11=dev1:6:6 [--contention dcf|none] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import signal
from dataclasses import dataclass, field

from toolkit.testbed.airtime import (
    CONTENTION_MODES,
    DEFAULT_FRAME_BYTES,
    DEFAULT_OVERHEAD_S,
    DcfScheduler,
    make_scheduler,
)

log = logging.getLogger("cpsl.wifi")

AP = "ap"
SLACK_S = 0.002  # the virtual clock may run this far ahead of real time before the relay sleeps
CATCH_UP_S = 0.05  # how far behind real time the medium's clock may fall and still be caught up


@dataclass(frozen=True)
class Station:
    name: str
    up_bps: float
    down_bps: float


@dataclass
class _Pipe:
    """One direction of one relayed connection: bytes waiting for airtime, then written out."""

    flow: str
    writer: asyncio.StreamWriter
    buffer: bytearray = field(default_factory=bytearray)
    space: asyncio.Event = field(default_factory=asyncio.Event)


class WifiRelay:
    def __init__(
        self,
        target: tuple[str, int],
        stations: dict[str, Station],
        frame_bytes: int = DEFAULT_FRAME_BYTES,
        overhead_s: float = DEFAULT_OVERHEAD_S,
        queue_bytes: int = 256 << 10,
        contention: str = "dcf",
        seed: int = 0,
    ) -> None:
        self.target = target
        self.stations = stations
        self.queue_bytes = queue_bytes
        self.scheduler = make_scheduler(contention, frame_bytes, overhead_s, seed)
        self.collisions = 0  # collisions on the medium so far (dcf)
        self.frames = 0
        self._pipes: dict[str, _Pipe] = {}
        self._wake = asyncio.Event()
        self._ids = itertools.count()

    async def serve(self, host: str, port: int) -> None:
        server = await asyncio.start_server(self._accept, host, port)
        async with server:
            await asyncio.gather(server.serve_forever(), self._transmit())

    async def _accept(self, device_reader: asyncio.StreamReader, device_writer: asyncio.StreamWriter) -> None:
        address = device_writer.get_extra_info("peername")[0]
        station = self.stations.get(address)
        if station is None:
            log.warning("connection from %s, which is no station of this medium: closed", address)
            device_writer.close()
            return
        try:
            broker_reader, broker_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 10)
        except (OSError, TimeoutError) as exc:
            log.warning("cannot reach %s:%d for %s: %s", *self.target, station.name, exc)
            device_writer.close()
            return
        number = next(self._ids)
        up = _Pipe(f"{station.name}/{number}/up", broker_writer)
        down = _Pipe(f"{station.name}/{number}/down", device_writer)
        self.scheduler.add_flow(up.flow, station.name, station.up_bps)
        self.scheduler.add_flow(down.flow, AP, station.down_bps)
        for pipe in (up, down):
            self._pipes[pipe.flow] = pipe
        try:
            await asyncio.gather(self._pump(device_reader, up), self._pump(broker_reader, down))
        except asyncio.CancelledError:
            pass  # the relay is shutting down
        finally:
            for pipe in (up, down):
                self._pipes.pop(pipe.flow, None)
                self.scheduler.remove_flow(pipe.flow)
                with contextlib.suppress(Exception):
                    pipe.writer.close()

    async def _pump(self, reader: asyncio.StreamReader, pipe: _Pipe) -> None:
        """Read what the sender offers into the flow's queue, while the queue has room."""
        try:
            while True:
                while len(pipe.buffer) >= self.queue_bytes:
                    pipe.space.clear()
                    await pipe.space.wait()
                data = await reader.read(64 << 10)
                if not data:
                    break
                pipe.buffer += data
                self.scheduler.enqueue(pipe.flow, len(data))
                self._wake.set()
        except (ConnectionError, OSError):
            pass
        while pipe.buffer and pipe.flow in self._pipes:  # let the medium carry what is left
            pipe.space.clear()
            await pipe.space.wait()

    def _blocked(self) -> set[str]:
        """Flows whose receiver is not taking bytes: not offered the medium until it does."""
        return {
            flow
            for flow, pipe in self._pipes.items()
            if pipe.writer.transport.get_write_buffer_size() > self.queue_bytes or pipe.writer.is_closing()
        }

    async def _transmit(self) -> None:
        loop = asyncio.get_running_loop()
        clock = loop.time()
        while True:
            sent = self.scheduler.next(self._blocked())
            if sent is None:
                if self.scheduler.backlogged():
                    await asyncio.sleep(0.001)  # only blocked receivers have bytes waiting
                else:
                    self._wake.clear()
                    await self._wake.wait()
                clock = max(clock, loop.time())
                continue
            # Continuously backlogged, the medium's clock runs on from the last frame: a late
            # wake-up (the event loop overslept, or was busy) is caught up by sending the frames
            # that fell due, not lost. Only CATCH_UP_S of lateness is caught up (a starved relay
            # must not burst for long); an idle medium's clock restarts at now (below).
            self.frames += 1
            self.collisions += sent.collisions
            clock = max(clock, loop.time() - CATCH_UP_S) + sent.airtime_s
            ahead = clock - loop.time()
            if ahead > SLACK_S:
                await asyncio.sleep(ahead)
            pipe = self._pipes.get(sent.flow)
            if pipe is None:
                continue
            chunk = bytes(pipe.buffer[: sent.nbytes])
            del pipe.buffer[: sent.nbytes]
            pipe.space.set()
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                pipe.writer.write(chunk)


def parse_station(text: str) -> tuple[str, Station]:
    """``ADDRESS=NAME:UP_MBIT:DOWN_MBIT``."""
    try:
        address, rest = text.split("=", 1)
        name, up, down = rest.split(":")
        station = Station(name, float(up) * 1e6, float(down) * 1e6)
    except ValueError:
        raise argparse.ArgumentTypeError(f"station {text!r} is not ADDRESS=NAME:UP_MBIT:DOWN_MBIT") from None
    if station.up_bps <= 0 or station.down_bps <= 0:
        raise argparse.ArgumentTypeError(f"station {text!r}: rates must be positive")
    return address, station


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A Wi-Fi medium for the emulated testbed (a TCP relay)")
    parser.add_argument("--listen", type=_host_port, required=True)
    parser.add_argument("--target", type=_host_port, required=True)
    parser.add_argument("--station", type=parse_station, action="append", required=True)
    parser.add_argument("--frame-bytes", type=int, default=DEFAULT_FRAME_BYTES)
    parser.add_argument(
        "--overhead-us",
        type=float,
        default=DEFAULT_OVERHEAD_S * 1e6,
        help="per-frame overhead with --contention none (with dcf the 802.11 timings decide it)",
    )
    parser.add_argument(
        "--contention",
        choices=CONTENTION_MODES,
        default="dcf",
        help="dcf: stations sending at once contend (random backoff, collisions); none: they take turns",
    )
    parser.add_argument("--seed", type=int, default=0, help="the backoff draws' seed (dcf)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s wifi %(levelname)s %(message)s")
    relay = WifiRelay(
        args.target,
        dict(args.station),
        args.frame_bytes,
        args.overhead_us * 1e-6,
        contention=args.contention,
        seed=args.seed,
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await relay.serve(*args.listen)
        if isinstance(relay.scheduler, DcfScheduler) and relay.scheduler.attempts:
            share = relay.scheduler.collided_attempts / relay.scheduler.attempts
            log.info(
                "%d frames through, %d collisions (%.1f%% of attempts collided)",
                relay.frames,
                relay.collisions,
                100 * share,
            )

    asyncio.run(run())


if __name__ == "__main__":
    main()
