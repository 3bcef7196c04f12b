"""Transport behind one seam (``Transport``); MQTT is the driver (``MqttTransport``)."""

from toolkit.transport.base import BrokerAddress, Transport, Will, parse_broker_url
from toolkit.transport.mqtt import MqttTransport

__all__ = ["BrokerAddress", "MqttTransport", "Transport", "Will", "parse_broker_url"]
