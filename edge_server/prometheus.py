"""The run as Prometheus metrics (``--metrics-port [HOST:]PORT``), with the official client.

Metric names follow Prometheus' conventions (base units, ``_total`` for counters, one
``cpsl_`` prefix); the labels are bounded sets (the scheme, message kinds, rejection
reasons, which the endpoint caps at a few dozen). Gauges hold the last round's values;
``cpsl_round_duration_seconds`` is a histogram of every round's. Each process gets its own
registry (no global state), and the counters the endpoint keeps are read at scrape time,
so a scrape never waits for a round.

| metric | type | meaning |
| --- | --- | --- |
| ``cpsl_rounds_total`` | counter | rounds completed by this process (a resumed run counts from its resume) |
| ``cpsl_round`` | gauge | the index of the last completed round |
| ``cpsl_round_duration_seconds`` | histogram | measured round latency |
| ``cpsl_round_latency_seconds`` | gauge | the last round's measured latency |
| ``cpsl_round_predicted_latency_seconds`` | gauge | the plan's prediction for it (absent when nothing was predicted) |
| ``cpsl_test_accuracy_ratio`` | gauge | test accuracy after the last round, 0-1 |
| ``cpsl_test_loss`` | gauge | test loss after the last round |
| ``cpsl_cut_layer`` | gauge | the cut of the last round (0: FL, the whole model on the devices) |
| ``cpsl_devices_online`` | gauge | devices registered and not gone |
| ``cpsl_devices_dropped_total`` | counter | devices dropped from a round |
| ``cpsl_sent_bytes_total{kind}`` | counter | bytes the server published, by message kind |
| ``cpsl_received_bytes_total{kind}`` | counter | bytes the server accepted, by message kind |
| ``cpsl_rejected_messages_total{reason}`` | counter | frames the server dropped, by reason |
"""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edge_server.connection_budget import ConnectionBudget
from toolkit.errors import UserError

ROUND_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, float("inf"))


class _LiveCounters(Collector):
    """The endpoint's own counters and the registry's online count, read at scrape time."""

    def __init__(self, server) -> None:
        self.server = server

    def collect(self) -> Iterable:
        endpoint = self.server.endpoint
        for name, help_text, label, values in (
            ("cpsl_sent_bytes", "Bytes the edge server published, by message kind.", "kind", endpoint.bytes_sent),
            (
                "cpsl_received_bytes",
                "Bytes the edge server accepted, by message kind.",
                "kind",
                endpoint.bytes_received,
            ),
            ("cpsl_rejected_messages", "Frames the edge server dropped, by reason.", "reason", endpoint.rejected),
        ):
            family = CounterMetricFamily(name, help_text, labels=[label])
            for key, value in sorted(dict(values).items()):
                family.add_metric([key], value)
            yield family
        unacknowledged = CounterMetricFamily(
            "cpsl_unacknowledged_flushes", "Waits for the broker's acknowledgement that timed out."
        )
        unacknowledged.add_metric([], endpoint.unacknowledged)
        yield unacknowledged
        online = GaugeMetricFamily("cpsl_devices_online", "Devices registered and not gone.")
        online.add_metric([], len(self.server.registry.online()))
        yield online


MAX_SCRAPERS = 16  # connections open at once: the endpoint's budget of threads and file descriptors
MAX_SCRAPERS_PER_ADDRESS = 4
SCRAPE_TIMEOUT_S = 10.0  # a request not read whole by then is dropped


class _QuietHandler(WSGIRequestHandler):
    """One scrape; a request that stalls is dropped at ``SCRAPE_TIMEOUT_S``; no access log."""

    timeout = SCRAPE_TIMEOUT_S

    def log_message(self, format: str, *args: object) -> None:
        pass


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """The client's threaded WSGI server with a cap on open connections (total and per
    address), decided before a byte is read: a flood of connections costs the run at most
    ``MAX_SCRAPERS`` threads and descriptors, however many arrive."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, *args, **kwargs) -> None:
        self.budget = ConnectionBudget(MAX_SCRAPERS, MAX_SCRAPERS_PER_ADDRESS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        if not self.budget.admit(str(client_address[0])):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.budget.release(str(client_address[0]))

    def handle_error(self, request, client_address) -> None:
        pass  # a scraper that hung up or timed out: nothing to report


class Exporter:
    """A registry of our own served over HTTP: ``serve`` on a port, ``close`` at the end."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._http: _BoundedServer | None = None

    def serve(self, host: str, port: int) -> None:
        server_class = type("Server", (_BoundedServer,), {"address_family": _family(host)})
        try:
            self._http = make_server(host, port, make_wsgi_app(self.registry), server_class, _QuietHandler)
        except OSError as exc:
            raise UserError(f"--metrics-port {host}:{port}: cannot listen ({exc.strerror or exc})") from None
        threading.Thread(target=self._http.serve_forever, name="metrics", daemon=True).start()

    @property
    def port(self) -> int:
        return self._http.server_port if self._http is not None else 0

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class RunMetrics(Exporter):
    """The exporter for one edge server: ``observe`` each round record; ``close`` at the end."""

    def __init__(self, server, scheme: str) -> None:
        super().__init__()
        labels = {"scheme": scheme}
        self.rounds = Counter("cpsl_rounds", "Rounds completed.", ["scheme"], registry=self.registry).labels(**labels)
        self.round = Gauge("cpsl_round", "Index of the last completed round.", registry=self.registry)
        self.duration = Histogram(
            "cpsl_round_duration_seconds", "Measured round latency.", buckets=ROUND_BUCKETS, registry=self.registry
        )
        self.latency = Gauge("cpsl_round_latency_seconds", "The last round's measured latency.", registry=self.registry)
        self.predicted = Gauge(
            "cpsl_round_predicted_latency_seconds", "The plan's latency for the last round.", registry=self.registry
        )
        self.accuracy = Gauge("cpsl_test_accuracy_ratio", "Test accuracy after the last round.", registry=self.registry)
        self.loss = Gauge("cpsl_test_loss", "Test loss after the last round.", registry=self.registry)
        self.cut = Gauge("cpsl_cut_layer", "Cut layer of the last round (0: FL).", registry=self.registry)
        self.dropped = Counter("cpsl_devices_dropped", "Devices dropped from a round.", registry=self.registry)
        # what the defences did, per device (a bounded set: the registry holds at most 1024)
        self.clipped_smashed = Counter(
            "cpsl_clipped_smashed_samples",
            "Smashed samples bounded in norm, by device.",
            ["device"],
            registry=self.registry,
        )
        self.capped_weights = Counter(
            "cpsl_capped_weights",
            "Uploads whose weight claim was over the cap, by device.",
            ["device"],
            registry=self.registry,
        )
        self.left_out = Counter(
            "cpsl_devices_left_out",
            "Rounds a device sat out for tripping a bound, by device.",
            ["device"],
            registry=self.registry,
        )
        self.registry.register(_LiveCounters(server))

    def observe(self, record: dict) -> None:
        self.rounds.inc()
        self.round.set(record["round"])
        self.duration.observe(record["latency_s"])
        self.latency.set(record["latency_s"])
        predicted = record.get("predicted_latency_s")
        if isinstance(predicted, int | float) and math.isfinite(predicted):
            self.predicted.set(predicted)
        for gauge, key in ((self.accuracy, "accuracy"), (self.loss, "loss")):
            if math.isfinite(record[key]):
                gauge.set(record[key])
        self.cut.set(record["cut"] or 0)
        self.dropped.inc(len(record.get("dropped") or ()))
        for device, count in (record.get("clipped_smashed") or {}).items():
            self.clipped_smashed.labels(device=device).inc(count)
        for device in record.get("capped_weights") or {}:
            self.capped_weights.labels(device=device).inc()
        for device in record.get("left_out") or {}:
            self.left_out.labels(device=device).inc()


def chain(*handlers: Callable[[dict], None]) -> Callable[[dict], None]:
    """One on_round callback from several."""

    def each(record: dict) -> None:
        for handler in handlers:
            handler(record)

    return each


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
