// The cpsl-edge run dashboard: draws the view edge_server/dashboard/view.py makes.
// Live (served by the edge server): the view arrives over server-sent events at /events.
// Report (edge_server report): the view is embedded in the page as window.CPSL_VIEW.
// Everything a device sent (ids, board names) goes into the page as text, never as HTML.
(function () {
  "use strict";

  const embedded = window.CPSL_VIEW || null;
  const token = new URLSearchParams(window.location.search).get("token");
  const state = { view: null, charts: {}, events: 0 };
  window.cpslDashboard = state; // for people poking at the page, and the browser tests

  const PARTS = [
    ["device_compute_s", "device compute", "#60a5fa"],
    ["uplink_s", "uplink", "#f59e0b"],
    ["server_compute_s", "server compute", "#10b981"],
    ["downlink_s", "downlink", "#a78bfa"],
    ["model_transfer_s", "model transfer", "#f472b6"],
    ["waiting_s", "waiting", "#d1d5db"],
  ];
  // the Gantt's phases: [label, colour, outlined]
  const PHASES = {
    weights_down: ["weights down (sent → first forward)", "#f472b6", false],
    forward: ["forward pass", "#60a5fa", false],
    slot: ["upload slot granted", "#b45309", true],
    upload: ["upload (as the device timed it)", "#f59e0b", false],
    server_step: ["server step", "#10b981", false],
    gradient: ["gradient sent", "#7c3aed", false],
    weights_up: ["weights up (last gradient → arrived)", "#db2777", false],
  };

  function withToken(path) {
    return token ? path + "?token=" + encodeURIComponent(token) : path;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    return typeof value === "number" ? value.toFixed(digits === undefined ? 2 : digits) : String(value);
  }

  function cell(row, text, numeric) {
    const td = document.createElement("td");
    td.textContent = text;
    if (numeric) td.className = "num";
    row.appendChild(td);
    return td;
  }

  // header ---------------------------------------------------------------------------------
  function renderRun() {
    const run = state.view.run || {};
    document.getElementById("run-title").textContent =
      [run.id, run.scheme, run.model].filter(Boolean).join(" · ") || "run";
    const done = state.view.rounds.length;
    const planned = run.rounds_planned ? " of " + run.rounds_planned : "";
    document.getElementById("run-progress").textContent =
      done + planned + " rounds · " + (run.state || "");
  }

  function setConnection(text, kind) {
    const badge = document.getElementById("connection");
    badge.textContent = text;
    badge.className = "badge " + (kind || "");
  }

  // fleet ----------------------------------------------------------------------------------
  function renderFleet() {
    const body = document.querySelector("#fleet tbody");
    body.replaceChildren();
    for (const device of state.view.fleet) {
      const row = document.createElement("tr");
      row.dataset.device = device.id;
      if (device.online === false) row.className = "offline";
      cell(row, device.id);
      const online = cell(row, "");
      if (device.online === null) {
        online.textContent = "–";
      } else {
        const dot = document.createElement("span");
        dot.className = "dot" + (device.online ? " on" : "");
        online.appendChild(dot);
        online.append(device.online ? " online" : " offline");
      }
      const profile = device.profile || {};
      cell(row, [device.board, device.accelerator].filter(Boolean).join(" · "));
      cell(
        row,
        profile.train_step_ms !== undefined
          ? profile.cores + " cores · " + fmt(profile.ram_gb, 1) + " GB · step " +
              fmt(profile.train_step_ms, 1) + " ms @ " + profile.batch
          : "–"
      );
      cell(row, fmt(device.samples, 0), true);
      cell(row, fmt(device.speed, 2), true);
      cell(row, fmt(device.up_mbit, 1), true);
      cell(row, fmt(device.down_mbit, 1), true);
      cell(row, fmt(device.rtt_ms, 1), true);
      cell(row, device.cluster === null || device.cluster === undefined ? "–" : String(device.cluster), true);
      cell(row, String(device.drops), true);
      cell(row, String(device.rejected), true);
      body.appendChild(row);
    }
  }

  // curves ---------------------------------------------------------------------------------
  function lineChart(id, datasets, scales) {
    return new Chart(document.getElementById(id), {
      type: "line",
      data: { labels: [], datasets: datasets },
      options: {
        animation: false,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        scales: scales,
        plugins: { legend: { position: "bottom" } },
      },
    });
  }

  function makeCharts() {
    state.charts.accuracy = lineChart(
      "accuracy",
      [
        { label: "test accuracy (%)", data: [], borderColor: "#2563eb", backgroundColor: "#2563eb", yAxisID: "y" },
        { label: "test loss", data: [], borderColor: "#dc2626", backgroundColor: "#dc2626", yAxisID: "y1" },
      ],
      {
        x: { title: { display: true, text: "round" } },
        y: { title: { display: true, text: "accuracy (%)" }, suggestedMin: 0, suggestedMax: 100 },
        y1: { position: "right", title: { display: true, text: "loss" }, grid: { drawOnChartArea: false } },
      }
    );
    state.charts.latency = lineChart(
      "latency",
      [
        { label: "measured (s)", data: [], borderColor: "#0f766e", backgroundColor: "#0f766e" },
        { label: "predicted (s)", data: [], borderColor: "#9333ea", backgroundColor: "#9333ea", borderDash: [6, 4] },
        { label: "lower bound (s)", data: [], borderColor: "#64748b", backgroundColor: "#64748b", borderDash: [2, 3] },
      ],
      { x: { title: { display: true, text: "round" } }, y: { title: { display: true, text: "seconds" }, min: 0 } }
    );
    state.charts.breakdown = new Chart(document.getElementById("breakdown"), {
      type: "bar",
      data: {
        labels: [],
        datasets: PARTS.map(([key, label, colour]) => ({ key: key, label: label, data: [], backgroundColor: colour })),
      },
      options: {
        animation: false,
        maintainAspectRatio: false,
        scales: {
          x: { stacked: true, title: { display: true, text: "round" } },
          y: { stacked: true, title: { display: true, text: "seconds" } },
        },
        plugins: { legend: { position: "bottom" } },
      },
    });
    state.charts.timeline = new Chart(document.getElementById("timeline"), {
      type: "bar",
      data: {
        labels: [],
        datasets: Object.entries(PHASES).map(([key, [label, colour, outlined]]) => ({
          key: key,
          label: label,
          data: [],
          grouped: false,
          backgroundColor: outlined ? "rgba(0,0,0,0)" : colour,
          borderColor: colour,
          borderWidth: outlined ? 1.5 : 0,
          barPercentage: outlined ? 0.95 : 0.6,
          categoryPercentage: 1.0,
          borderSkipped: false,
        })),
      },
      options: {
        indexAxis: "y",
        animation: false,
        maintainAspectRatio: false,
        parsing: { xAxisKey: "x", yAxisKey: "y" },
        scales: {
          x: { type: "linear", min: 0, title: { display: true, text: "seconds from the round's start" } },
          y: { type: "category" },
        },
        plugins: {
          legend: { position: "bottom" },
          tooltip: {
            callbacks: {
              label: (item) => {
                const point = item.raw;
                const where = point.iteration === undefined ? "" : " · iteration " + point.iteration;
                return item.dataset.label + where + ": " + fmt(point.x[0], 3) + "–" + fmt(point.x[1], 3) + " s";
              },
            },
          },
        },
      },
    });
  }

  function renderCurves() {
    const rounds = state.view.rounds;
    const labels = rounds.map((r) => r.round);
    const accuracy = state.charts.accuracy;
    accuracy.data.labels = labels;
    accuracy.data.datasets[0].data = rounds.map((r) => (r.accuracy === null ? null : r.accuracy * 100));
    accuracy.data.datasets[1].data = rounds.map((r) => r.loss);
    accuracy.update("none");
    const latency = state.charts.latency;
    latency.data.labels = labels;
    latency.data.datasets[0].data = rounds.map((r) => r.latency_s);
    latency.data.datasets[1].data = rounds.map((r) => r.predicted_latency_s);
    latency.data.datasets[2].data = rounds.map((r) => r.bound_s);
    latency.update("none");
    const breakdown = state.charts.breakdown;
    breakdown.data.labels = labels;
    for (const dataset of breakdown.data.datasets) {
      dataset.data = rounds.map((r) => r.breakdown[dataset.key]);
    }
    breakdown.update("none");
  }

  // timeline -------------------------------------------------------------------------------
  // which part of the round the Gantt shows: a turn (or all), the first N iterations (or all)
  function timelineFilter() {
    const turn = document.getElementById("timeline-turn").value;
    const iterations = document.getElementById("timeline-iterations").value;
    return {
      turn: turn === "all" ? null : Number(turn),
      iterations: iterations === "all" ? null : Number(iterations),
    };
  }

  function timelineBars(timeline, filter) {
    const bars = Object.fromEntries(Object.keys(PHASES).map((key) => [key, []]));
    const labels = [];
    // an abandoned attempt (a device restarted mid-turn) gets its own lines, above the retry's
    const labelOf = (row) => {
      const label = "turn " + row.cluster + " · " + row.device + (row.abandoned ? " (abandoned)" : "");
      if (!labels.includes(label)) labels.push(label);
      return label;
    };
    let span = 0;
    for (const row of timeline.rows) {
      for (const value of [row.upload_end, row.slot_end, row.gradient_sent, row.server_step && row.server_step[1]]) {
        if (typeof value === "number") span = Math.max(span, value);
      }
    }
    for (const row of timeline.transfers || []) {
      if (typeof row.weights_arrived === "number") span = Math.max(span, row.weights_arrived);
    }
    const tick = Math.max(span / 400, 1e-4); // an instant drawn as a sliver
    const firstForward = {};
    const shown = (row) =>
      (filter.turn === null || row.cluster === filter.turn) &&
      (filter.iterations === null || row.iteration === undefined || row.iteration < filter.iterations);
    for (const row of timeline.rows) {
      if (!shown(row)) continue;
      const y = labelOf(row);
      const add = (key, start, end) => {
        if (typeof start === "number" && typeof end === "number") {
          bars[key].push({ x: [start, Math.max(end, start + tick)], y: y, iteration: row.iteration });
        }
      };
      if (typeof row.forward_start === "number") {
        add("forward", row.forward_start, row.forward_start + row.forward_s);
        const key = y;
        firstForward[key] = Math.min(firstForward[key] === undefined ? Infinity : firstForward[key], row.forward_start);
      }
      add("slot", row.slot_start, row.slot_end);
      add("upload", row.upload_start, row.upload_end);
      if (row.server_step) add("server_step", row.server_step[0], row.server_step[1]);
      add("gradient", row.gradient_sent, row.gradient_sent);
    }
    for (const row of timeline.transfers || []) {
      if (!shown(row)) continue;
      const y = labelOf(row);
      const forward = firstForward[y];
      if (typeof row.weights_sent === "number") {
        const end = forward === undefined ? row.weights_sent : forward;
        bars.weights_down.push({ x: [row.weights_sent, Math.max(end, row.weights_sent + tick)], y: y });
      }
      if (filter.iterations === null && typeof row.last_gradient_sent === "number" && typeof row.weights_arrived === "number") {
        bars.weights_up.push({
          x: [row.last_gradient_sent, Math.max(row.weights_arrived, row.last_gradient_sent + tick)],
          y: y,
        });
      }
    }
    return { bars: bars, labels: labels };
  }

  function renderTimeline() {
    const timeline = state.view.timeline;
    const box = document.getElementById("timeline-box");
    document.getElementById("timeline-empty").hidden = Boolean(timeline);
    box.hidden = !timeline;
    if (!timeline) return;
    document.getElementById("timeline-title").textContent = "Round timeline: round " + timeline.round;
    const turns = document.getElementById("timeline-turn");
    const clusters = [...new Set(timeline.rows.map((row) => row.cluster))].sort((a, b) => a - b);
    const offered = [...turns.options].slice(1).map((option) => Number(option.value));
    if (offered.join() !== clusters.join()) {
      const chosen = turns.value;
      turns.replaceChildren(new Option("all", "all"), ...clusters.map((c) => new Option(String(c), String(c))));
      turns.value = clusters.map(String).includes(chosen) ? chosen : "all";
    }
    const filter = timelineFilter();
    const { bars, labels } = timelineBars(timeline, filter);
    box.style.height = Math.max(160, 28 * labels.length + 90) + "px";
    const chart = state.charts.timeline;
    chart.data.labels = labels;
    for (const dataset of chart.data.datasets) dataset.data = bars[dataset.key];
    // a part of the round: the axis starts where its first bar does
    const starts = Object.values(bars).flat().map((bar) => bar.x[0]);
    const zoomed = filter.turn !== null || filter.iterations !== null;
    chart.options.scales.x.min = zoomed && starts.length ? Math.max(0, Math.min(...starts) - 0.002) : 0;
    chart.update("none");
  }

  // decisions ------------------------------------------------------------------------------
  function renderDecisions() {
    const body = document.querySelector("#decisions tbody");
    body.replaceChildren();
    const rounds = state.view.rounds;
    // newest first; every re-selection, and the last 100 rounds
    const shown = rounds.filter((r, i) => r.reselection || i >= rounds.length - 100).reverse();
    for (const r of shown) {
      const row = document.createElement("tr");
      row.dataset.round = r.round;
      if (r.reselection) row.className = "reselected";
      cell(row, String(r.round), true);
      cell(row, r.cut === null ? "none (FL)" : r.cut + (r.cut_name ? " · " + r.cut_name : ""));
      cell(row, r.clusters.map((members) => "[" + members.join(", ") + "]").join(" "));
      cell(row, r.medium || "–");
      cell(row, r.encodings || "fp32");
      cell(row, r.bytes_up === null ? "–" : fmt(r.bytes_up / 1e6, 2) + " / " + fmt(r.bytes_down / 1e6, 2), true);
      cell(row, r.efficiency === null ? "–" : fmt(r.efficiency, 2), true);
      cell(row, r.reselection || "");
      cell(row, r.dropped.join(", "));
      cell(row, r.restarted.join(", "));
      body.appendChild(row);
    }
  }

  // data in --------------------------------------------------------------------------------
  function renderAll() {
    renderRun();
    renderFleet();
    renderCurves();
    renderTimeline();
    renderDecisions();
  }

  function applyView(view) {
    state.view = view;
    renderAll();
  }

  // Live updates are drawn at most once a second: a fast run (the demo finishes a round
  // every half second) would otherwise redraw every chart twice a second on the viewer's CPU.
  const RENDERERS = { run: renderRun, fleet: renderFleet, curves: renderCurves, timeline: renderTimeline,
    decisions: renderDecisions };
  const dirty = new Set();
  let timer = null;
  let drawnAt = 0;
  function later(...parts) {
    for (const part of parts) dirty.add(part);
    if (timer !== null) return;
    timer = setTimeout(() => {
      timer = null;
      drawnAt = performance.now();
      for (const part of Object.keys(RENDERERS)) if (dirty.has(part)) RENDERERS[part]();
      dirty.clear();
    }, Math.max(0, 1000 - (performance.now() - drawnAt)));
  }

  function listen() {
    const source = new EventSource(withToken("events"));
    const on = (name, handler) =>
      source.addEventListener(name, (event) => {
        state.events += 1;
        handler(JSON.parse(event.data));
      });
    on("view", applyView);
    on("rounds", (data) => {
      state.view.rounds.push(...data.rows);
      if (data.timeline) state.view.timeline = data.timeline;
      later("run", "curves", "timeline", "decisions");
    });
    on("fleet", (fleet) => {
      state.view.fleet = fleet;
      later("fleet");
    });
    on("run", (run) => {
      state.view.run = run;
      later("run");
      if (run.state === "finished" || run.state === "failed") {
        source.close(); // the server is going away: nothing more will come
        setConnection("run " + run.state, run.state === "failed" ? "lost" : "report");
      }
    });
    source.onopen = () => setConnection("live", "live");
    source.onerror = () => {
      if (source.readyState !== EventSource.CLOSED) setConnection("connection lost: retrying", "lost");
    };
  }

  makeCharts();
  for (const id of ["timeline-turn", "timeline-iterations"]) {
    document.getElementById(id).addEventListener("change", () => state.view && renderTimeline());
  }
  if (embedded) {
    applyView(embedded);
    setConnection("report", "report");
  } else {
    listen();
  }
})();
