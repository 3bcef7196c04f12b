"""The Wi-Fi medium: the airtime scheduler's rule (pure), and the relay carrying real TCP on loopback."""

from __future__ import annotations

import asyncio
import socket

import pytest

from toolkit.testbed.airtime import (
    DEFAULT_OVERHEAD_S,
    MAC_HEADER_BYTES,
    AirtimeScheduler,
    frame_airtime,
    saturated_throughput,
)
from toolkit.testbed.wifi import Station, WifiRelay, parse_station


def test_a_frame_holds_the_medium_for_its_bits_at_the_rate_plus_the_overhead() -> None:
    assert frame_airtime(1500, 12e6) == pytest.approx(8 * (1500 + MAC_HEADER_BYTES) / 12e6 + DEFAULT_OVERHEAD_S)


def test_saturated_stations_get_equal_throughput_dragged_down_by_the_slowest() -> None:
    fast_alone = saturated_throughput([54e6])[0]
    fast, slow = saturated_throughput([54e6, 6e6])
    assert fast == slow  # the performance anomaly: equal opportunities, equal bytes
    assert fast < saturated_throughput([6e6])[0] < fast_alone
    # without overhead, n stations of one rate r split it evenly
    assert saturated_throughput([10e6] * 4, overhead_s=0)[0] == pytest.approx(10e6 / 4 * 1500 / 1534)


def test_backlogged_contenders_take_turns_one_frame_each_and_the_ap_is_one_contender() -> None:
    scheduler = AirtimeScheduler(frame_bytes=1000)
    scheduler.add_flow("a/up", "a", 10e6)
    scheduler.add_flow("b/up", "b", 1e6)
    scheduler.add_flow("a/down", "ap", 10e6)
    scheduler.add_flow("b/down", "ap", 1e6)
    for flow in ("a/up", "b/up", "a/down", "b/down"):
        scheduler.enqueue(flow, 10_000)
    order = [scheduler.next().flow for _ in range(6)]
    assert order == ["a/up", "b/up", "a/down", "a/up", "b/up", "b/down"]  # the AP's two flows share one turn
    sizes = []
    scheduler = AirtimeScheduler(frame_bytes=1000)
    scheduler.add_flow("x", "x", 1e6)
    scheduler.enqueue("x", 2500)
    while (sent := scheduler.next()) is not None:
        sizes.append(sent.nbytes)
    assert sizes == [1000, 1000, 500] and not scheduler.backlogged()


def test_a_blocked_flow_is_skipped_and_keeps_its_bytes() -> None:
    scheduler = AirtimeScheduler(frame_bytes=100)
    scheduler.add_flow("a", "a", 1e6)
    scheduler.add_flow("b", "b", 1e6)
    scheduler.enqueue("a", 100)
    scheduler.enqueue("b", 100)
    assert scheduler.next(blocked={"a"}).flow == "b"
    assert scheduler.next(blocked={"a"}) is None and scheduler.queued["a"] == 100
    assert scheduler.next().flow == "a"


def test_station_flags_are_checked() -> None:
    assert parse_station("10.77.0.10=dev0:24:12")[1] == Station("dev0", 24e6, 12e6)
    for bad in ("10.77.0.10", "10.77.0.10=dev0:x:1", "a=b:0:1"):
        with pytest.raises(Exception, match="station"):
            parse_station(bad)


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_the_relay_carries_tcp_both_ways_and_a_slow_station_drags_a_fast_one() -> None:
    """Two saturated stations at 40 and 4 Mbit/s get about the same throughput (the anomaly),
    and what goes through arrives intact and in order."""

    async def scenario() -> tuple[dict[int, int], bytes]:
        sink_port, relay_port = _port(), _port()
        stations = {"127.0.0.10": Station("fast", 40e6, 40e6), "127.0.0.11": Station("slow", 4e6, 4e6)}
        relay = WifiRelay(("127.0.0.1", sink_port), stations)
        counts: dict[int, int] = {}
        echoed = bytearray()

        async def sink(reader, writer) -> None:
            index = int((await reader.readexactly(1)).decode())
            if index == 2:  # the echo check: send back what came
                writer.write(await reader.readexactly(100_000))
                await writer.drain()
                return
            while data := await reader.read(1 << 16):
                counts[index] = counts.get(index, 0) + len(data)

        server = await asyncio.start_server(sink, "127.0.0.1", sink_port)
        relay_task = asyncio.create_task(relay.serve("127.0.0.1", relay_port))
        await asyncio.sleep(0.1)
        stop = asyncio.Event()

        async def flood(index: int) -> None:
            _, writer = await asyncio.open_connection("127.0.0.1", relay_port, local_addr=(f"127.0.0.{10 + index}", 0))
            writer.write(str(index).encode())
            while not stop.is_set():
                writer.write(bytes(32 << 10))
                await writer.drain()
            writer.close()

        floods = [asyncio.create_task(flood(i)) for i in (0, 1)]
        await asyncio.sleep(0.5)  # warm-up: queues fill
        before = dict(counts)
        await asyncio.sleep(2.0)
        window = {i: counts.get(i, 0) - before.get(i, 0) for i in (0, 1)}
        stop.set()
        await asyncio.gather(*floods, return_exceptions=True)
        reader, writer = await asyncio.open_connection("127.0.0.1", relay_port, local_addr=("127.0.0.10", 0))
        message = bytes(range(256)) * 390 + bytes(160)
        writer.write(b"2" + message)
        echoed += await asyncio.wait_for(reader.readexactly(len(message)), 20)
        writer.close()
        relay_task.cancel()
        server.close()
        await asyncio.gather(relay_task, return_exceptions=True)
        return window, bytes(echoed) == message

    counts, intact = asyncio.run(scenario())
    assert intact
    fast, slow = counts[0], counts[1]
    assert 0.7 < fast / slow < 1.4, counts  # equal opportunities, not 10x
    predicted = saturated_throughput([40e6, 4e6])[0] * 2.0 / 8
    assert 0.7 * predicted < fast < 1.3 * predicted  # about the formula's share, far below 40 Mbit/s alone
