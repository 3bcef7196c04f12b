"""The MQTT driver against a real Mosquitto: delivery, retained registration, last will, bad brokers."""

from __future__ import annotations

import queue
import time

import pytest

from toolkit.errors import UserError
from toolkit.transport import MqttTransport, Will, parse_broker_url


def client(url: str, name: str, inbox: queue.Queue, will: Will | None = None) -> MqttTransport:
    transport = MqttTransport(parse_broker_url(url), name, lambda topic, data: inbox.put((topic, data)), will=will)
    transport.connect(timeout_s=5)
    return transport


def test_publish_subscribe_large_payload_intact(broker) -> None:
    inbox: queue.Queue = queue.Queue()
    receiver = client(broker, "receiver", inbox)
    receiver.subscribe("t/#")
    time.sleep(0.2)
    sender = client(broker, "sender", queue.Queue())
    payload = bytes(range(256)) * 4096  # 1 MiB
    sender.publish("t/x", payload)
    assert sender.flush(5)
    assert inbox.get(timeout=5) == ("t/x", payload)
    sender.close()
    receiver.close()


def test_last_will_is_published_when_a_client_vanishes(broker) -> None:
    inbox: queue.Queue = queue.Queue()
    watcher = client(broker, "watcher", inbox)
    watcher.subscribe("status/#")
    time.sleep(0.2)
    doomed = MqttTransport(
        parse_broker_url(broker), "doomed", lambda *_: None, will=Will("status/doomed", b"offline"), keepalive_s=1
    )
    doomed.connect(timeout_s=5)
    doomed.publish("status/doomed", b"online", retain=True)
    assert inbox.get(timeout=5) == ("status/doomed", b"online")
    doomed._client._sock.close()  # the network dies under it: no DISCONNECT packet is sent
    doomed._client.loop_stop()
    assert inbox.get(timeout=10) == ("status/doomed", b"offline")
    watcher.close()


def test_retained_status_reaches_late_subscribers(broker) -> None:
    early = client(broker, "early", queue.Queue())
    early.publish("status/a", b"online", retain=True)
    assert early.flush(5)
    inbox: queue.Queue = queue.Queue()
    late = client(broker, "late", inbox)
    late.subscribe("status/+")
    assert inbox.get(timeout=5) == ("status/a", b"online")
    early.close()
    late.close()


def test_unreachable_broker_is_one_clear_error() -> None:
    from tests.brokers import free_port

    with pytest.raises(UserError, match=r"cannot reach broker mqtt://127\.0\.0\.1:\d+ within 1 s"):
        MqttTransport(parse_broker_url(f"mqtt://127.0.0.1:{free_port()}"), "x", lambda *_: None).connect(1)


@pytest.mark.parametrize("url", ["http://host:1883", "mqtt://:1883", "mqtt://host:99999"])
def test_bad_broker_urls(url) -> None:
    with pytest.raises(UserError, match="broker URL"):
        parse_broker_url(url)
