/* outrider dashboard: the pages, drawn from the agent's JSON with uPlot.
 * Live: an EventSource says when the run's stored file grew; the page then fetches the
 * points of its charts again (downsampled by the server, spikes kept). */
"use strict";

const outrider = (window.outrider = { charts: {}, refreshes: 0 });
const main = document.getElementById("main");
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2",
                "#db2777", "#65a30d", "#ea580c", "#4b5563"];
const MAX_LINES = 10;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params || {})) {
    for (const one of Array.isArray(value) ? value : [value]) {
      if (one !== undefined && one !== null && one !== "") query.append(key, one);
    }
  }
  const response = await fetch(path + (query.toString() ? "?" + query : ""));
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

function fmt(value) {
  if (value === null || value === undefined) return "-";
  if (typeof value !== "number") return String(value);
  const abs = Math.abs(value);
  if (abs !== 0 && (abs >= 1e6 || abs < 1e-3)) return value.toExponential(3);
  return Number.isInteger(value) ? String(value) : value.toPrecision(4);
}

/* Axis ticks: short enough for the axis gutter (1.5M, 3e-4, 0.25). */
function tick(value) {
  if (value === null || value === undefined) return "";
  const abs = Math.abs(value);
  if (abs >= 1e3) {
    const [scale, unit] = abs >= 1e12 ? [1e12, "T"] : abs >= 1e9 ? [1e9, "G"] : abs >= 1e6 ? [1e6, "M"] : [1e3, "k"];
    return +(value / scale).toPrecision(3) + unit;
  }
  if (abs !== 0 && abs < 1e-2) return value.toExponential(1).replace("e-", "e-").replace(".0e", "e");
  return String(+value.toPrecision(3));
}

function when(epoch) {
  return epoch ? new Date(epoch * 1000).toLocaleString() : "-";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.floor(seconds), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return (h ? `${h}:${String(m).padStart(2, "0")}` : `${m}`) + ":" + String(s % 60).padStart(2, "0");
}

function runLink(id) {
  return el("a", { href: "/run?id=" + encodeURIComponent(id) }, id);
}

/* -- live updates --------------------------------------------------------------------- */
function live(run, onGrown) {
  const badge = document.getElementById("live");
  const source = new EventSource("/api/events" + (run ? "?run=" + encodeURIComponent(run) : ""));
  let pending = null;
  const redraw = (counted) => {
    if (pending) return;
    pending = setTimeout(async () => {
      pending = null;
      try { await onGrown(); if (counted) outrider.refreshes++; } catch (error) { console.error(error); }
    }, 200);
  };
  source.addEventListener("hello", () => {
    badge.textContent = "\u25CF live";
    badge.className = "on";
    // The server counts growth from this connection on: what was stored between the
    // page's first fetch and now sends no "grown" (a finished run's last alert), so draw
    // once more. Not counted in refreshes, which count redraws caused by growth.
    redraw(false);
  });
  source.addEventListener("grown", () => redraw(true));
  source.onerror = () => { badge.textContent = "\u25CF reconnecting"; badge.className = "off"; };
  return source;
}

/* -- charts ---------------------------------------------------------------------------- */

/* Wheel zooms the x axis around the cursor; shift-drag (or the middle button) pans it.
 * A plain drag selects a range to zoom into; a double click shows everything again. */
function panZoomPlugin(onRange) {
  return {
    hooks: {
      ready(u) {
        const over = u.over;
        over.addEventListener("wheel", (event) => {
          event.preventDefault();
          const { min, max } = u.scales.x;
          if (min === null || max === null) return;
          const at = u.posToVal(event.offsetX, "x");
          const factor = event.deltaY < 0 ? 0.8 : 1.25;
          u.setScale("x", { min: at - (at - min) * factor, max: at + (max - at) * factor });
        }, { passive: false });
        u.root.addEventListener("mousedown", (event) => {
          if (!(event.shiftKey || event.button === 1)) return;
          event.preventDefault();
          event.stopPropagation();
          const startX = event.clientX;
          const { min, max } = u.scales.x;
          const perPixel = (max - min) / over.clientWidth;
          const move = (e) => {
            const shift = (e.clientX - startX) * perPixel;
            u.setScale("x", { min: min - shift, max: max - shift });
          };
          const up = () => {
            document.removeEventListener("mousemove", move);
            document.removeEventListener("mouseup", up);
          };
          document.addEventListener("mousemove", move);
          document.addEventListener("mouseup", up);
        }, true);
        over.addEventListener("dblclick", () => onRange(u, true));
      },
    },
  };
}

/* Vertical marks at the steps where alerts fired (step charts only). */
function marksPlugin(getMarks) {
  return {
    hooks: {
      draw(u) {
        const marks = getMarks();
        if (!marks.length || u.scales.x.time) return;
        const ctx = u.ctx;
        ctx.save();
        for (const mark of marks) {
          const x = u.valToPos(mark.step, "x", true);
          if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
          ctx.strokeStyle = mark.severity === "warning" ? "#d97706aa" : "#dc2626aa";
          ctx.setLineDash([4, 3]);
          ctx.beginPath();
          ctx.moveTo(x, u.bbox.top);
          ctx.lineTo(x, u.bbox.top + u.bbox.height);
          ctx.stroke();
        }
        ctx.restore();
      },
    },
  };
}

/* A chart panel: ``fetchSeries(range)`` returns {label: {axis, x, y}}; the panel redraws
 * on ``refresh()``, keeps a zoomed range (and asks the server for that range's detail). */
class Chart {
  constructor(parent, title, fetchSeries, options) {
    this.title = title;
    this.fetchSeries = fetchSeries;
    this.options = options || {};
    this.panel = el("div", { class: "panel", "data-chart": title }, el("h3", {}, title));
    this.body = el("div", {}, el("div", { class: "empty" }, "loading"));
    this.panel.append(this.body);
    parent.append(this.panel);
    this.plot = null;
    this.labels = null;
    this.range = null; // [min, max] while zoomed
    this.points = 0;
    outrider.charts[title] = this;
  }

  async refresh() {
    const series = await this.fetchSeries(this.range);
    let names = Object.keys(series);
    if (!names.length) {
      this.destroy();
      this.body.replaceChildren(el("div", { class: "empty" }, "no data"));
      this.points = 0;
      return;
    }
    const axis = series[names[0]].axis;
    names = names.filter((name) => series[name].axis === axis);
    if (this.options.sameUnit) {
      const unit = (name) => name.replace(/^window\//, "");
      names = names.filter((name) => unit(name) === unit(names[0]));
    }
    names = names.slice(0, MAX_LINES);
    if (this.range === null) {
      const xs = names.map((name) => series[name].x).filter((x) => x.length);
      this.extent = [Math.min(...xs.map((x) => x[0])), Math.max(...xs.map((x) => x[x.length - 1]))];
    }
    const data = names.length === 1
      ? [series[names[0]].x, series[names[0]].y]
      : uPlot.join(names.map((name) => [series[name].x, series[name].y]));
    this.points = names.reduce((sum, name) => sum + series[name].y.filter((v) => v !== null).length, 0);
    const key = axis + "|" + names.join("|");
    if (!this.plot || key !== this.labels) {
      this.destroy();
      this.body.replaceChildren();
      this.labels = key;
      this.plot = new uPlot(this.spec(names, axis), data, this.body);
    } else {
      this.plot.setData(data, this.range === null);
    }
    if (this.range !== null) this.plot.setScale("x", { min: this.range[0], max: this.range[1] });
  }

  spec(names, axis) {
    const width = Math.max(this.panel.clientWidth - 18, 300);
    const onRange = (u, reset) => {
      this.range = reset ? null : [u.scales.x.min, u.scales.x.max];
      clearTimeout(this.rangeTimer);
      this.rangeTimer = setTimeout(() => this.refresh(), 150);
    };
    return {
      width,
      height: 220,
      scales: { x: { time: axis === "time" }, y: { distr: this.options.log ? 3 : 1 } },
      axes: [{ label: axis === "time" ? "" : "step" }, { size: 56, values: (u, ticks) => ticks.map(tick) }],
      series: [
        { label: axis },
        ...names.map((name, index) => ({
          label: name,
          stroke: COLORS[index % COLORS.length],
          width: 1.25,
          spanGaps: false, // a NaN (null) is a gap; join() fills other series' steps with undefined, which is spanned
          points: { show: false },
          value: (u, v) => fmt(v),
        })),
      ],
      cursor: { drag: { x: true, y: false, setScale: true } },
      hooks: {
        // Any change of the x range the page did not make itself (drag, wheel, pan)
        setScale: [(u, key) => {
          if (key !== "x" || u.scales.x.min === null) return;
          const { min, max } = u.scales.x;
          const same = (a, b) => Math.abs(a - b) <= 1e-9 * Math.max(1, Math.abs(a), Math.abs(b));
          if (this.range && same(min, this.range[0]) && same(max, this.range[1])) return;
          if (!this.range && this.extent && min <= this.extent[0] && max >= this.extent[1]) return;
          onRange(u);
        }],
      },
      plugins: [panZoomPlugin(onRange), marksPlugin(this.options.marks || (() => []))],
    };
  }

  destroy() {
    if (this.plot) this.plot.destroy();
    this.plot = null;
    this.labels = null;
  }
}

/* -- pages ----------------------------------------------------------------------------- */
async function runsPage() {
  main.replaceChildren(el("h1", {}, "Runs"), el("div", { id: "runs" }, "loading"));
  const draw = async () => {
    const { runs, runs_dir } = await api("/api/runs");
    const rows = runs.map((run) => el("tr", { "data-run": run.run_id },
      el("td", {}, runLink(run.run_id)),
      el("td", { class: "status-" + run.status }, run.status || "?"),
      el("td", { class: "num" }, fmt(run.last_step ?? run.steps)),
      el("td", { class: "num" }, run.throughput === null ? "-" :
        `${fmt(run.throughput)} ${(run.throughput_unit || "").replace("_per_second", "/s")}`),
      el("td", {}, Object.entries(run.alerts).map(([sev, n]) =>
        el("span", { class: "sev-" + sev }, `${n} ${sev} `))),
      el("td", {}, when(run.start_time)),
      el("td", { class: "num" }, duration(run.duration_s)),
      el("td", { class: "num" }, fmt(run.records)),
      el("td", { class: "num" }, fmt((run.dropped || 0) + (run.lost || 0)))));
    document.getElementById("runs").replaceChildren(
      runs.length ? el("table", {},
        el("tr", {}, ["run", "status", "step", "throughput", "alerts", "started", "duration",
                      "records", "dropped+lost"].map((h) => el("th", {}, h))),
        rows) : el("p", { class: "muted" }, `no runs in ${runs_dir} yet`));
  };
  await draw();
  live(null, draw);
}

const RUN_CHARTS = [
  ["loss", ["loss", "val/loss", "train/loss"], { log: false }],
  ["learning rate", ["lr", "lr/*", "learning_rate"]],
  ["gradient norm", ["grad_norm", "grad_norm/*"]],
  ["throughput", ["tokens_per_second", "samples_per_second", "steps_per_second",
                  "window/tokens_per_second", "window/samples_per_second", "window/steps_per_second"],
   { sameUnit: true }],
  ["step time (s)", ["step_time_seconds", "step_time_seconds/p50", "step_time_seconds/p90",
                     "step_time_seconds/p99"]],
  ["system CPU and GPU (%)", ["system/cpu_percent", "system/gpu*util*"]],
  ["system memory (bytes)", ["system/memory_used_bytes", "system/gpu*memory_used*",
                             "cuda_memory_allocated_bytes", "cuda_memory_reserved_bytes"]],
  ["feature effective rank", ["features/*/effective_rank"]],
  ["feature statistics", ["features/*/mean_pairwise_cosine", "features/*/collapse_ratio",
                          "features/*/effective_rank_ratio"]],
];

async function runPage(params) {
  const run = params.get("id");
  if (!run) { location.href = "/"; return; }
  const facts = el("div", { class: "facts" });
  const grid = el("div", { class: "grid" });
  const extra = el("div", { class: "grid" });
  let rank = params.get("rank");
  const rankPicker = el("select", { id: "rank", hidden: "" });
  rankPicker.addEventListener("change", () => {
    rank = rankPicker.value;
    const url = new URL(location.href);
    url.searchParams.set("rank", rank);
    history.replaceState(null, "", url);
    for (const chart of charts) chart.refresh();
  });
  const picker = el("select", { id: "add-metric" }, el("option", { value: "" }, "add a chart for a metric..."));
  const maps = el("div", { class: "images" });
  const texts = el("div", {});
  const alerts = el("div", {});
  const downloads = el("div", { class: "row" },
    ["csv", "json", "parquet"].map((format) => el("a", {
      href: `/download/export?run=${encodeURIComponent(run)}&format=${format}`, download: "",
      "data-download": format }, format.toUpperCase())),
    el("a", { href: "/download/report?run=" + encodeURIComponent(run), download: "",
              "data-download": "report" }, "HTML report"),
    el("a", { href: "/export?run=" + encodeURIComponent(run) }, "more export options"));
  main.replaceChildren(el("h1", {}, "Run ", run), facts, downloads,
    el("div", { class: "row" }, rankPicker), grid,
    el("div", { class: "row" }, picker), extra,
    el("h2", {}, "Alerts"), alerts, el("h2", {}, "Latest maps and images"), maps,
    el("h2", {}, "Text samples"), texts);
  let alertMarks = [];
  const marks = () => alertMarks;
  const charts = RUN_CHARTS.map(([title, names, options]) => new Chart(grid, title,
    async (range) => (await api("/api/series", { run, names, rank, lo: range?.[0], hi: range?.[1],
      buckets: 600 })).series, { ...(options || {}), marks }));
  const seen = new Set();
  picker.addEventListener("change", () => {
    const name = picker.value;
    picker.value = "";
    if (!name || outrider.charts[name]) return;
    const chart = new Chart(extra, name, async (range) => (await api("/api/series",
      { run, names: [name], rank, lo: range?.[0], hi: range?.[1], buckets: 600 })).series, { marks });
    charts.push(chart);
    chart.refresh();
  });
  const draw = async () => {
    const info = await api("/api/run", { run });
    const i = info.info || {};
    facts.replaceChildren(...[
      ["status", i.status], ["last step", i.last_step], ["records", i.records],
      ["dropped", i.dropped], ["lost", i.lost], ["started", when(i.start_time)],
      ["host", i.host], ["command", (i.command || []).join(" ")],
    ].map(([k, v]) => el("span", {}, el("b", {}, k), v ?? "-")));
    if (info.ranks.length > 1 && rankPicker.options.length !== info.ranks.length) {
      rankPicker.replaceChildren(...info.ranks.map((r) => el("option", { value: r }, `rank ${r}`)));
      rank = rank ?? String(info.ranks[0]);
      rankPicker.value = rank;
      rankPicker.hidden = false;
    }
    for (const name of info.metrics) {
      if (!seen.has(name)) { seen.add(name); picker.append(el("option", { value: name }, name)); }
    }
    alertMarks = info.alerts.filter((a) => typeof a.step === "number");
    alerts.replaceChildren(info.alerts.length ? el("table", { id: "alert-timeline" },
      el("tr", {}, ["time", "step", "rank", "severity", "alert", "message"].map((h) => el("th", {}, h))),
      info.alerts.slice().reverse().map((a) => el("tr", {},
        el("td", {}, when(a.t)), el("td", { class: "num" }, fmt(a.step)), el("td", {}, fmt(a.rank)),
        el("td", { class: "sev-" + a.severity }, a.severity), el("td", {}, a.name),
        el("td", { title: a.advice || "" }, a.message))))
      : el("p", { class: "muted" }, "no alerts"));
    maps.replaceChildren(...(info.images.length ? info.images.map((image) => el("figure", {},
      el("img", { src: `/api/image?run=${encodeURIComponent(run)}&name=${encodeURIComponent(image.name)}&step=${image.step}`,
                  alt: image.name, loading: "lazy" }),
      el("figcaption", { class: "hint" }, `${image.name} @ step ${fmt(image.step)}`)))
      : [el("p", { class: "muted" }, "no images yet")]));
    texts.replaceChildren(...(info.texts.length ? info.texts.slice().reverse().map((t) =>
      el("div", {}, el("div", { class: "hint" }, `${t.name} @ step ${fmt(t.step)}`),
        el("pre", { class: "text" }, t.text))) : [el("p", { class: "muted" }, "no text samples")]));
    await Promise.all(charts.map((chart) => chart.refresh()));
  };
  await draw();
  live(run, draw);
}

async function comparePage(params) {
  const chosen = new Set(params.getAll("runs"));
  const metric = params.get("metric") || "loss";
  const { runs } = await api("/api/runs");
  const input = el("input", { name: "metric", value: metric, list: "metric-names", size: 30 });
  const names = el("datalist", { id: "metric-names" });
  const picks = el("div", { class: "runpick" }, runs.map((run) => el("label", {},
    el("input", { type: "checkbox", name: "runs", value: run.run_id,
                  checked: chosen.has(run.run_id) ? "" : null }), " ", run.run_id,
    el("span", { class: "muted" }, ` ${run.status || ""}`))));
  const form = el("form", { class: "row", method: "get", action: "/compare" },
    el("label", {}, "metric ", input, names), picks, el("button", { type: "submit" }, "compare"));
  const grid = el("div", {});
  main.replaceChildren(el("h1", {}, "Compare"), form,
    el("p", { class: "hint" }, "Pick runs and a metric; shell patterns are not used here, the name is exact."), grid);
  if (runs.length) {
    const first = chosen.size ? [...chosen][0] : runs[0].run_id;
    api("/api/run", { run: first }).then((info) =>
      names.replaceChildren(...info.metrics.map((name) => el("option", { value: name })))).catch(() => {});
  }
  if (!chosen.size) return;
  const chart = new Chart(grid, `compare ${metric}`, async (range) => (await api("/api/compare",
    { runs: [...chosen], metric, lo: range?.[0], hi: range?.[1], buckets: 600 })).series);
  await chart.refresh();
  live(null, () => chart.refresh());
}

async function alertsPage() {
  main.replaceChildren(el("h1", {}, "Alerts"), el("div", { id: "alerts" }, "loading"));
  const table = (items, id) => el("table", { id },
    el("tr", {}, ["time", "run", "step", "rank", "severity", "alert", "message"].map((h) => el("th", {}, h))),
    items.map((a) => el("tr", {}, el("td", {}, when(a.t)), el("td", {}, runLink(a.run)),
      el("td", { class: "num" }, fmt(a.step)), el("td", {}, fmt(a.rank)),
      el("td", { class: "sev-" + a.severity }, a.severity), el("td", {}, a.name),
      el("td", { title: a.advice || "" }, a.message))));
  const draw = async () => {
    const data = await api("/api/alerts");
    document.getElementById("alerts").replaceChildren(
      el("h2", {}, `Active (${data.active.length})`),
      el("p", { class: "hint" }, `fired in the last ${data.active_seconds / 60} minutes by a run still going`),
      data.active.length ? table(data.active, "active-alerts") : el("p", { class: "muted" }, "none"),
      el("h2", {}, `History (${data.total})`),
      data.history.length ? table(data.history, "alert-history") : el("p", { class: "muted" }, "no alerts stored"));
  };
  await draw();
  live(null, draw);
}

async function exportPage(params) {
  const { runs } = await api("/api/runs");
  const chosen = params.get("run") || (runs[0] && runs[0].run_id);
  const select = el("select", { name: "run" }, runs.map((run) =>
    el("option", { value: run.run_id, selected: run.run_id === chosen ? "" : null }, run.run_id)));
  const format = el("select", { name: "format" }, ["csv", "json", "parquet"].map((f) => el("option", { value: f }, f)));
  const layout = el("select", { name: "layout" },
    el("option", { value: "wide" }, "wide: a row per step"), el("option", { value: "long" }, "long: a row per value"));
  const metrics = el("input", { name: "metrics", placeholder: "loss val/* (blank: all)", size: 30 });
  const link = el("a", { id: "export-link", download: "" }, "download");
  const report = el("a", { id: "report-link", download: "" }, "HTML report");
  const update = () => {
    const query = new URLSearchParams({ run: select.value, format: format.value, layout: layout.value });
    for (const pattern of metrics.value.split(/[\s,]+/).filter(Boolean)) query.append("metrics", pattern);
    link.href = "/download/export?" + query;
    report.href = "/download/report?run=" + encodeURIComponent(select.value);
  };
  for (const input of [select, format, layout, metrics]) input.addEventListener("input", update);
  main.replaceChildren(el("h1", {}, "Export"),
    runs.length ? el("div", { class: "row" }, select, format, layout, metrics, link, report)
      : el("p", { class: "muted" }, "no runs yet"),
    el("p", { class: "hint" }, "The same tables as `outrider export RUN --format csv|json|parquet --layout wide|long --metrics PATTERN`."));
  update();
}

const PAGES = { "/": runsPage, "/run": runPage, "/compare": comparePage, "/alerts": alertsPage, "/export": exportPage };

(async () => {
  const page = PAGES[location.pathname] || runsPage;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.getAttribute("href") === location.pathname) link.classList.add("here");
  }
  try {
    await page(new URLSearchParams(location.search));
    outrider.ready = true;
  } catch (error) {
    main.append(el("p", { class: "sev-error" }, String(error)));
    outrider.error = String(error);
  }
})();
