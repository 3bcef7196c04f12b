"""The dashboard without a browser (issue #13): the view from round records, the live server over
HTTP and server-sent events during a real run (real Mosquitto, real agents), its token on a
non-loopback address, and the static report. tests/test_dashboard_browser.py draws them in chromium."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from edge_server.dashboard import view as v
from edge_server.dashboard.feed import LiveFeed
from edge_server.dashboard.report import render_report, report_view
from edge_server.dashboard.web import DashboardServer
from edge_server.server import EdgeServer
from tests.agents import start_agents
from tests.servers import close, server_config
from toolkit.data import load_dataset
from toolkit.errors import UserError
from toolkit.models import load_model


def record(round_: int, **extra) -> dict:
    base = {
        "round": round_,
        "run": "r1",
        "scheme": "cpsl",
        "cut": 6,
        "cut_name": "pool2",
        "clusters": [["dev0", "dev1"], ["dev2"]],
        "accuracy": 0.5 + round_ / 10,
        "loss": 1.0,
        "train_loss": 1.2,
        "latency_s": 2.0,
        "predicted_latency_s": 1.8,
        "bound_s": 1.5,
        "efficiency": 0.75,
        "breakdown": {"device_compute_s": 1.0, "uplink_s": 0.5, "waiting_s": 0.5},
        "dropped": [],
        "time": 1000.0 + round_,
    }
    base.update(extra)
    return base


TIMELINE = [
    {"device": "dev0", "cluster": 0, "iteration": 0, "forward_s": 0.01, "forward_start": 0.1, "upload_start": 0.11},
    {"device": "dev0", "cluster": 0, "iteration": 1, "forward_start": 0.3, "forward_s": 0.01, "gradient_sent": 0.4},
]


def test_round_rows_keep_what_is_drawn_and_turn_nan_into_gaps():
    row = v.round_row(
        record(
            3,
            loss=float("nan"),
            restarted_turns=[{"cluster": 0, "device": "dev1"}],
            decision={
                "medium": {"uplink": "airtime", "downlink": "shared"},
                "cut_selection": {"reason": "drift"},
                "compression": {"encodings": ["int8+zstd", "fp16"]},
            },
            bytes_up=1.5e6,
            bytes_down=2e6,
        )
    )
    assert row["loss"] is None and row["accuracy"] == pytest.approx(0.8)
    assert set(row["breakdown"]) == set(v.BREAKDOWN_PARTS) and row["breakdown"]["server_compute_s"] == 0.0
    assert (row["restarted"], row["medium"], row["reselection"]) == (["dev1"], "airtime up, shared down", "drift")
    assert (row["encodings"], row["bytes_up"], row["bytes_down"]) == ("int8+zstd up, fp16 down", 1.5e6, 2e6)
    assert (row["bound_s"], row["efficiency"]) == (1.5, 0.75)
    assert v.round_row(record(0))["encodings"] is None  # nothing compressed
    assert v.round_row(record(0, bound_s=None, efficiency=None))["efficiency"] is None  # a baseline's round
    assert json.loads(v.to_json({"x": [float("inf"), 1.5]})) == {"x": [None, 1.5]}


def test_the_fleet_counts_drops_and_takes_the_last_estimates_and_clusters():
    records = [
        record(0, dropped=["dev1"], decision={"estimates": {"dev0": {"up_bps": 2e6, "speed": 1.0}}}),
        record(1, clusters=[["dev2", "dev0"]], dropped=["dev1"], decision={"estimates": {"dev0": {"up_bps": 4e6}}}),
    ]
    infos = {"dev0": {"id": "dev0", "board": "Raspberry Pi 4", "samples": 100}}
    rows = {r["id"]: r for r in v.fleet_rows(infos, records, online={"dev0": True}, rejected={"dev2": 3})}
    assert list(rows) == ["dev0", "dev1", "dev2"]  # dev1 was seen in a round's clusters only
    assert rows["dev0"]["board"] == "Raspberry Pi 4" and rows["dev0"]["up_mbit"] == 4.0
    assert (rows["dev0"]["cluster"], rows["dev1"]["cluster"], rows["dev2"]["cluster"]) == (0, None, 0)
    assert (rows["dev1"]["drops"], rows["dev2"]["rejected"], rows["dev1"]["online"]) == (2, 3, False)
    assert v.fleet_rows(infos, records)[0]["online"] is None  # a finished run: unknown, not "offline"


def test_a_live_run_streams_its_rounds_and_fleet_and_wants_the_token_off_loopback(broker, tmp_path):
    data = load_dataset("builtin:digits", seed=0)
    agents, _ = start_agents(broker, data, 2)
    config = server_config(broker, tmp_path, rounds=3, min_devices=2)
    server = EdgeServer(config, load_model("lenet5", seed=0), data)
    feed = LiveFeed(server, {"id": server.run_id, "rounds_planned": 3})
    dashboard = DashboardServer(feed, "0.0.0.0", 0)
    dashboard.start()
    base = f"http://127.0.0.1:{dashboard.port}"
    events: list[tuple[str, dict]] = []

    def read_events() -> None:
        with urllib.request.urlopen(f"{base}/events?token={dashboard.token}", timeout=30) as stream:
            name = ""
            for raw in stream:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[len("event: ") :]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[len("data: ") :])))

    reader = threading.Thread(target=read_events, daemon=True)
    reader.start()
    try:
        assert dashboard.token and dashboard.token in dashboard.url
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/api/view", timeout=10)
        assert refused.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as wrong:
            urllib.request.urlopen(f"{base}/events?token=not-it", timeout=10)
        assert wrong.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/static/..%2Frun_state.py", timeout=10)
        assert missing.value.code == 404
        assert urllib.request.urlopen(f"{base}/static/dashboard.js", timeout=10).status == 200  # no data in it
        server.run()
        bearer = urllib.request.Request(f"{base}/api/view", headers={"Authorization": f"Bearer {dashboard.token}"})
        final = json.loads(urllib.request.urlopen(bearer, timeout=10).read())
        feed.state = "finished"
    finally:
        dashboard.close()
        close(agents)
    reader.join(timeout=30)
    assert not reader.is_alive()  # the server closed the stream when it stopped
    assert events[-1] == ("run", {**final["run"], "state": "finished"})  # and said how the run ended
    assert events[0][0] == "view"
    streamed = [row for name, d in events if name == "rounds" for row in d["rows"]]
    assert [row["round"] for row in streamed] == [0, 1, 2]  # each round once, as it finished
    assert [row["accuracy"] for row in streamed] == [r["accuracy"] for r in server.history]
    assert [r["round"] for r in final["rounds"]] == [0, 1, 2]
    fleet = {row["id"]: row for row in final["fleet"]}
    assert sorted(fleet) == ["dev0", "dev1"] and all(row["online"] for row in fleet.values())
    assert all(row["samples"] > 0 and row["cluster"] == 0 for row in fleet.values())
    timeline = final["timeline"]
    assert timeline["round"] == 2 and len(timeline["rows"]) == 2 * config.iterations
    assert {(t["device"], "weights_sent" in t, "weights_arrived" in t) for t in timeline["transfers"]} == {
        ("dev0", True, True),
        ("dev1", True, True),
    }


def test_the_report_is_one_file_that_fetches_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [record(0), record(1, timeline=TIMELINE, transfers=[{"device": "dev0", "cluster": 0}])]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"round": 2, "acc')
    (run / "run.json").write_text(json.dumps({"model": "lenet5", "config": {"rounds": 5, "run_id": "r1"}}))
    (run / "fleet.json").write_text(json.dumps({"devices": [{"id": "dev0", "board": "Jetson Orin Nano"}]}))
    view = report_view(run)
    assert [r["round"] for r in view["rounds"]] == [0, 1]  # the line the crash cut short is not a round
    assert view["run"]["rounds_planned"] == 5 and view["timeline"]["round"] == 1
    assert view["fleet"][0]["board"] == "Jetson Orin Nano"
    html = render_report(run)
    assert "window.CPSL_VIEW" in html and "Chart.js v4" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # no fetch: no external src or href
    assert "sourceMappingURL" not in html
    assert "</script" not in html.split("window.CPSL_VIEW", 1)[1].split("</script>", 1)[0]


@pytest.mark.slow
def test_a_run_directory_that_is_not_one_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"no metrics\.jsonl"):
        render_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('["not a record"]\n')
    with pytest.raises(UserError, match="not a round record"):
        render_report(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "edge_server", "report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.html")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "no metrics.jsonl" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_dashboard_port_in_use_is_one_clear_error(broker, tmp_path):
    config = server_config(broker, tmp_path)
    server = EdgeServer(config, load_model("lenet5", seed=0), load_dataset("builtin:digits", seed=0))
    first = DashboardServer(LiveFeed(server, {}), "127.0.0.1", 0)
    first.start()
    try:
        assert first.token is None and first.url == f"http://127.0.0.1:{first.port}/"  # loopback: no token
        with pytest.raises(UserError, match=f"--dashboard 127.0.0.1:{first.port}: cannot listen"):
            DashboardServer(LiveFeed(server, {}), "127.0.0.1", first.port).start()
    finally:
        first.close()
