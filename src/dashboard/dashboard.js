// The toolgate dashboard. Hand-written; the charts are drawn by the vendored uPlot.
// Every number and row comes from the daemon already filtered by policy for this viewer; data
// is only ever set as text, never as HTML.
//
// Stable hooks (tests/browser* target these; keep them):
//   nav:      #nav a[data-view=live|agents|tools|policies|charts]   (the current one has .current)
//   views:    section#view-live|#view-agents|#view-tools|#view-policies|#view-charts
//             [data-view=...]; each non-live view has data-state = idle|loading|ready|error
//             (ready once its data is painted); the shown view has no `hidden` attribute
//   live:     form#filters (inputs name=principal,node,server,tool,effect,kind), #status,
//             table#decisions tbody tr[data-id] (cells: time kind principal node server tool
//             effect outcome latency), body[data-live=filling|painted] and the performance mark
//             toolgate:live-painted once the backfill is painted, aside#detail with #d-id #d-effect #d-rule #d-reason
//             #d-outcome #d-latency #d-explain #d-arguments
//   agents:   select#agents-window, #agents-source (rollups|rows),
//             table#agents-principals tbody tr[data-principal] and table#agents-nodes tbody
//             tr[data-node], cells td.calls td.denials td.last
//   tools:    select#tools-window, #tools-source, table#tools-table tbody
//             tr[data-server][data-tool], cells td.calls td.denials td.p50 td.p99
//   policies: #policy-hash #policy-loaded #policy-dir #policy-files li, #policy-error (hidden
//             unless the last reload failed) #policy-error-text, form#try-form (hidden without
//             the toolgate_policy/explain permission; then #try-denied shows) with inputs
//             name=principal,roles,attr,server,tool,arguments, #try-result #try-effect
//             (allow|deny) #try-reason #try-trace
//   charts:   #chart-hour and #chart-day (uPlot inside), each with data-allow / data-deny =
//             the totals drawn, data-points = minutes; #charts-source
"use strict";

const MAX_ROWS = 500;
const REFRESH_MS = 15000;
let source = null;
const rows = new Map();

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
}

function latency(us) {
  if (us === null || us === undefined) return "";
  return us >= 1000 ? (us / 1000).toFixed(1) + " ms" : us + " µs";
}

function when(t) {
  return t ? t.replace("T", " ").replace("Z", "") : "";
}

// ---- Live decisions ----

function addRow(row) {
  if (rows.has(row.id)) return;
  const body = document.querySelector("#decisions tbody");
  const tr = document.createElement("tr");
  tr.dataset.id = row.id;
  cell(tr, row.time.replace("T", " ").slice(0, 23));
  cell(tr, row.kind);
  cell(tr, row.principal);
  cell(tr, row.node);
  cell(tr, row.server);
  cell(tr, row.tool || row.method);
  cell(tr, row.effect, row.effect);
  cell(tr, row.outcome);
  cell(tr, latency(row.latency_us));
  tr.addEventListener("click", () => showDetail(row.id, tr));
  body.insertBefore(tr, body.firstChild);
  rows.set(row.id, row);
  while (body.rows.length > MAX_ROWS) {
    const last = body.rows[body.rows.length - 1];
    rows.delete(last.dataset.id);
    body.removeChild(last);
  }
}

function set(id, text) {
  document.getElementById(id).textContent = text === null || text === undefined ? "" : String(text);
}

function fill(row) {
  set("d-id", row.id);
  set("d-effect", row.effect + " (" + row.action + ")");
  set("d-rule", (row.policy || "-") + " / " + (row.rule || "-"));
  set("d-reason", row.reason);
  set("d-outcome", row.outcome);
  set("d-latency", latency(row.latency_us) || "-");
  set("d-explain", JSON.stringify(row.explain, null, 2));
  set("d-arguments", JSON.stringify(row.arguments, null, 2));
  document.getElementById("detail").hidden = false;
}

async function showDetail(id, tr) {
  document.querySelectorAll("#decisions tr.selected").forEach((t) => t.classList.remove("selected"));
  tr.classList.add("selected");
  fill(rows.get(id));
  // The latest outcome and latency may have arrived after the row was streamed.
  try {
    const r = await fetch("/api/audit?id=" + encodeURIComponent(id), { credentials: "same-origin" });
    if (!r.ok) return;
    const page = await r.json();
    if (page.rows && page.rows.length === 1) {
      rows.set(id, page.rows[0]);
      fill(page.rows[0]);
    }
  } catch (e) {
    set("status", "detail: " + e);
  }
}

function connect() {
  if (source) source.close();
  rows.clear();
  document.querySelector("#decisions tbody").replaceChildren();
  document.getElementById("detail").hidden = true;
  const params = new URLSearchParams();
  new FormData(document.getElementById("filters")).forEach((v, k) => {
    if (v) params.set(k, v);
  });
  set("status", "connecting…");
  source = new EventSource("/api/audit/stream?" + params.toString());
  source.addEventListener("open", () => set("status", "live"));
  source.addEventListener("error", () => set("status", "reconnecting…"));
  source.addEventListener("decision", (e) => addRow(JSON.parse(e.data)));
  // The backfill is in the table: once the frame showing it is painted, mark it (the browser
  // tests and scripts/bench-dashboard read `toolgate:live-painted` and body[data-live]).
  document.body.dataset.live = "filling";
  source.addEventListener("backfilled", () => {
    requestAnimationFrame(() => setTimeout(() => {
      performance.mark("toolgate:live-painted");
      document.body.dataset.live = "painted";
    }, 0));
  });
}

// ---- JSON views ----

async function getJSON(url, opts) {
  const r = await fetch(url, Object.assign({ credentials: "same-origin" }, opts || {}));
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.error && (body.error.message || body.error)) || r.status + " " + r.statusText);
  return body;
}

async function load(view, work) {
  const section = document.getElementById("view-" + view);
  section.dataset.state = "loading";
  try {
    await work();
    section.dataset.state = "ready";
  } catch (e) {
    section.dataset.state = "error";
    section.dataset.error = String(e.message || e);
  }
}

function sourceNote(id, data) {
  set(id, "counted from " + (data.source === "rollups" ? "rollups (every row)" : "the rows you may read")
    + (data.truncated ? ", newest rows only" : "") + ", " + when(data.from) + " to " + when(data.to) + " UTC");
}

function table(id, items, key, fillRow) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  for (const it of items) {
    const tr = document.createElement("tr");
    key(tr, it);
    fillRow(tr, it);
    body.appendChild(tr);
  }
}

const views = {
  agents: () => load("agents", async () => {
    const w = document.getElementById("agents-window").value;
    const d = await getJSON("/api/dashboard/agents?window=" + encodeURIComponent(w));
    sourceNote("agents-source", d);
    const tally = (tr, it, others) => {
      cell(tr, others.join(", "));
      cell(tr, when(it.last_active), "last");
      cell(tr, it.calls, "calls");
      cell(tr, it.denials, "denials");
    };
    table("agents-principals", d.principals, (tr, it) => { tr.dataset.principal = it.principal; },
      (tr, it) => { cell(tr, it.principal); tally(tr, it, it.nodes); });
    table("agents-nodes", d.nodes, (tr, it) => { tr.dataset.node = it.node; },
      (tr, it) => { cell(tr, it.node); tally(tr, it, it.principals); });
  }),
  tools: () => load("tools", async () => {
    const w = document.getElementById("tools-window").value;
    const d = await getJSON("/api/dashboard/tools?window=" + encodeURIComponent(w));
    sourceNote("tools-source", d);
    table("tools-table", d.tools, (tr, it) => { tr.dataset.server = it.server; tr.dataset.tool = it.tool; },
      (tr, it) => {
        cell(tr, it.server);
        cell(tr, it.tool);
        cell(tr, it.calls, "calls");
        cell(tr, it.denials, "denials");
        cell(tr, latency(it.p50_us), "p50");
        cell(tr, latency(it.p99_us), "p99");
      });
  }),
  policies: () => load("policies", async () => {
    const d = await getJSON("/api/dashboard/policies");
    set("policy-hash", d.hash);
    set("policy-loaded", when(d.loaded_at) + " UTC");
    set("policy-dir", d.dir);
    const ul = document.getElementById("policy-files");
    ul.replaceChildren();
    for (const f of d.files) {
      const li = document.createElement("li");
      li.textContent = f;
      ul.appendChild(li);
    }
    const err = document.getElementById("policy-error");
    err.hidden = !d.last_error;
    if (d.last_error) {
      set("policy-error-at", when(d.last_error.at) + " UTC");
      set("policy-error-text", d.last_error.errors.join("\n"));
    }
    document.getElementById("try-form").hidden = !d.may_explain;
    document.getElementById("try-denied").hidden = !!d.may_explain;
    const sel = document.getElementById("try-server");
    if (sel.options.length === 0) {
      for (const s of d.servers) {
        const o = document.createElement("option");
        o.textContent = s;
        sel.appendChild(o);
      }
    }
    const form = document.getElementById("try-form");
    if (!form.elements.principal.value) form.elements.principal.value = document.getElementById("viewer").textContent;
  }),
  charts: () => load("charts", async () => {
    const [h, d] = await Promise.all([
      getJSON("/api/dashboard/chart?range=hour"),
      getJSON("/api/dashboard/chart?range=day"),
    ]);
    sourceNote("charts-source", h);
    draw("chart-hour", h.series);
    draw("chart-day", d.series);
  }),
};

const charts = {};

function draw(id, s) {
  const el = document.getElementById(id);
  const sum = (a) => a.reduce((x, y) => x + y, 0);
  el.dataset.allow = sum(s.allow);
  el.dataset.deny = sum(s.deny);
  el.dataset.points = s.t.length;
  const data = [s.t, s.allow, s.deny];
  if (charts[id]) {
    charts[id].setData(data);
    return;
  }
  const opts = {
    width: Math.max(320, el.clientWidth || 800),
    height: 220,
    scales: { x: { time: true } },
    series: [
      {},
      { label: "allow", stroke: "#070", fill: "rgba(0,119,0,0.08)" },
      { label: "deny", stroke: "#b00", fill: "rgba(187,0,0,0.08)" },
    ],
    axes: [{}, { label: "decisions / min" }],
  };
  charts[id] = new uPlot(opts, data, el);
}

async function tryDecision(e) {
  e.preventDefault();
  const f = e.target.elements;
  const out = document.getElementById("try-result");
  let body;
  try {
    body = {
      principal: {
        id: f.principal.value,
        roles: f.roles.value.split(",").map((r) => r.trim()).filter((r) => r),
        attr: JSON.parse(f.attr.value || "{}"),
      },
      server: f.server.value,
      tool: f.tool.value,
      arguments: JSON.parse(f.arguments.value || "{}"),
    };
  } catch (err) {
    out.hidden = false;
    set("try-effect", "error");
    set("try-reason", "not JSON: " + err.message);
    set("try-trace", "");
    return;
  }
  try {
    const d = await getJSON("/api/dashboard/explain", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    set("try-effect", d.effect);
    set("try-reason", d.result ? d.result.reason : "");
    set("try-trace", JSON.stringify(d.trace, null, 2));
  } catch (err) {
    set("try-effect", "error");
    set("try-reason", String(err.message || err));
    set("try-trace", "");
  }
  out.hidden = false;
}

// ---- navigation ----

let refresh = null;

function show() {
  const name = (location.hash || "#live").slice(1);
  const view = views[name] || name === "live" ? name : "live";
  document.querySelectorAll("main > section").forEach((s) => { s.hidden = s.dataset.view !== view; });
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("current", a.dataset.view === view));
  clearInterval(refresh);
  if (views[view]) {
    views[view]();
    if (view !== "policies") refresh = setInterval(views[view], REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("filters");
  form.addEventListener("submit", (e) => { e.preventDefault(); connect(); });
  const q = new URLSearchParams(location.search);
  for (const el of form.elements) {
    if (el.name && q.has(el.name)) el.value = q.get(el.name);
  }
  document.getElementById("agents-window").addEventListener("change", () => views.agents());
  document.getElementById("tools-window").addEventListener("change", () => views.tools());
  document.getElementById("try-form").addEventListener("submit", tryDecision);
  window.addEventListener("hashchange", show);
  connect();
  show();
});
