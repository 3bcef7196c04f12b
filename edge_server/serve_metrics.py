"""The split-inference service as Prometheus metrics (``edge_server serve --metrics-port``).

Everything is read from the service at scrape time (its counters, its endpoint's byte and
rejection counts, its last requests' server times), so a scrape never waits for a request
and the service keeps no second set of books. The labels are bounded sets: cuts (at most
the model's layers), message kinds, and rejection reasons (the endpoint caps those).

| metric | type | meaning |
| --- | --- | --- |
| ``cpsl_infer_requests_total{cut}`` | counter | requests answered with logits, by cut |
| ``cpsl_infer_inputs_total`` | counter | inputs classified (a request carries a batch) |
| ``cpsl_infer_forward_passes_total`` | counter | forward passes run: fewer than requests when requests were merged |
| ``cpsl_infer_refused_total`` | counter | requests answered with a refusal |
| ``cpsl_infer_rejected_total{reason}`` | counter | refusals and dropped frames, by reason |
| ``cpsl_infer_server_seconds{quantile}`` | gauge | decode + model time, last 1,000 requests: 0.5, 0.9, 0.99 |
| ``cpsl_infer_sent_bytes_total{kind}`` | counter | bytes published, by message kind |
| ``cpsl_infer_received_bytes_total{kind}`` | counter | bytes accepted, by message kind |
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edge_server.prometheus import Exporter

QUANTILES = (0.5, 0.9, 0.99)


class _ServiceCollector(Collector):
    def __init__(self, service) -> None:
        self.service = service

    def collect(self) -> Iterable:
        service, endpoint = self.service, self.service.endpoint
        requests = CounterMetricFamily("cpsl_infer_requests", "Requests answered with logits, by cut.", labels=["cut"])
        for cut, count in sorted(dict(service.served).items()):
            requests.add_metric([str(cut)], count)
        yield requests
        for name, help_text, value in (
            ("cpsl_infer_inputs", "Inputs classified.", service.samples),
            ("cpsl_infer_forward_passes", "Forward passes run (requests merged: fewer).", service.forwards),
            ("cpsl_infer_refused", "Requests answered with a refusal.", service.refused),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        for name, help_text, label, values in (
            ("cpsl_infer_rejected", "Refusals and dropped frames, by reason.", "reason", endpoint.rejected),
            ("cpsl_infer_sent_bytes", "Bytes the service published, by kind.", "kind", endpoint.bytes_sent),
            ("cpsl_infer_received_bytes", "Bytes the service accepted, by kind.", "kind", endpoint.bytes_received),
        ):
            family = CounterMetricFamily(name, help_text, labels=[label])
            for key, value in sorted(dict(values).items()):
                family.add_metric([key], value)
            yield family
        times = sorted(service.server_s)
        if times:
            quantiles = GaugeMetricFamily(
                "cpsl_infer_server_seconds",
                "Decode plus model time per answered request (the last 1,000).",
                labels=["quantile"],
            )
            for q in QUANTILES:
                quantiles.add_metric([f"{q:g}"], times[min(len(times) - 1, int(q * len(times)))])
            yield quantiles


class ServiceMetrics(Exporter):
    """The exporter for one TailService: ``serve`` on a port, ``close`` at the end."""

    def __init__(self, service) -> None:
        super().__init__()
        self.registry.register(_ServiceCollector(service))
