// The toolgate dashboard. Hand-written and loaded `async` at the end of the body; uPlot (the
// charts) is loaded only when the Charts view opens. Every number and row comes from the daemon
// already filtered by policy for this viewer; data is only ever set as text, never as HTML.
//
// The Live table arrives filled: the daemon renders the viewer's newest rows into the page (a
// screenful in the table, the rest in template#more-rows), so they paint before any script
// runs. After the first frame this script moves the rest in and adopts them all, then opens the
// stream after the chain position they were read at (#live-state[data-after]): no row twice,
// none missed.
//
// Stable hooks (tests/browser* target these; keep them):
//   nav:      #nav a[data-view=live|agents|tools|policies|charts]   (the current one has .current)
//   views:    section#view-live|#view-agents|#view-tools|#view-policies|#view-charts
//             [data-view=...]; each non-live view has data-state = idle|loading|ready|error
//             (ready once its data is painted); the shown view has no `hidden` attribute
//   live:     form#filters (inputs name=principal,node,server,tool,effect,kind), #status,
//             table#decisions tbody tr[data-id][data-seq] (cells: time kind principal node
//             server tool effect outcome latency; td.outcome and td.latency change when the
//             row's outcome arrives on the stream), button#older ("load older", hidden when no
//             older row is left), body[data-live=filling|painted] and the performance mark
//             toolgate:live-painted at the frame that first painted the rows (the
//             server-rendered rows: from Element Timing; after a filter change: the frame after
//             the stream's backfill), aside#detail with #d-id #d-effect #d-rule #d-reason
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
const PAGE_ROWS = 100;
const REFRESH_MS = 15000;
let source = null;
// id -> the row as streamed (null for a server-rendered row: its detail is fetched), and its tr.
const rows = new Map();
const trs = new Map();
// "Load older": the cursor of the next older page, and rows loaded that way (kept, not trimmed).
let older = "";
let olderRows = 0;

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
}

// Like the daemon's live::latency_text (the server-rendered rows).
function latency(us) {
  if (us === null || us === undefined) return "";
  if (us < 1000) return us + " µs";
  const tenths = Math.floor((us + 50) / 100);
  return Math.floor(tenths / 10) + "." + (tenths % 10) + " ms";
}

function when(t) {
  return t ? t.replace("T", " ").replace("Z", "") : "";
}

function tbody() {
  return document.querySelector("#decisions tbody");
}

// ---- Live decisions ----

function addRow(row, atEnd) {
  if (trs.has(row.id)) return;
  const body = tbody();
  const tr = document.createElement("tr");
  tr.dataset.id = row.id;
  tr.dataset.seq = row.seq;
  cell(tr, row.time.replace("T", " ").slice(0, 23));
  cell(tr, row.kind);
  cell(tr, row.principal);
  cell(tr, row.node);
  cell(tr, row.server);
  cell(tr, row.tool || row.method);
  cell(tr, row.effect, row.effect);
  cell(tr, row.outcome, "outcome");
  cell(tr, latency(row.latency_us), "latency");
  if (atEnd) body.appendChild(tr);
  else body.insertBefore(tr, body.firstChild);
  rows.set(row.id, row);
  trs.set(row.id, tr);
  while (body.rows.length > MAX_ROWS + olderRows) {
    const last = body.rows[body.rows.length - 1];
    rows.delete(last.dataset.id);
    trs.delete(last.dataset.id);
    body.removeChild(last);
  }
}

// A row's outcome arrived (`outcome` event): update it in place.
function updateOutcome(o) {
  const tr = trs.get(o.id);
  if (!tr) return;
  tr.querySelector("td.outcome").textContent = o.outcome;
  tr.querySelector("td.latency").textContent = latency(o.latency_us);
  const row = rows.get(o.id);
  if (row) {
    row.outcome = o.outcome;
    row.latency_us = o.latency_us;
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
  if (rows.get(id)) fill(rows.get(id));
  // The latest outcome and latency may have arrived after the row was streamed; a
  // server-rendered row carries only its cells.
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

function filterParams() {
  const params = new URLSearchParams();
  new FormData(document.getElementById("filters")).forEach((v, k) => {
    if (v) params.set(k, v);
  });
  return params;
}

function setOlder(cursor) {
  older = cursor || "";
  document.getElementById("older").hidden = !older;
}

// The next older page through /api/audit (keyset paging: `cursor` = the previous page's
// `next`; a user's pages name their principal, so they walk the (principal, time) index, like
// the backfill).
async function loadOlder() {
  const btn = document.getElementById("older");
  if (!older || btn.disabled) return;
  btn.disabled = true;
  const params = filterParams();
  const own = document.getElementById("live-state").dataset.own;
  if (own && !params.has("principal")) params.set("principal", own);
  params.set("limit", String(PAGE_ROWS));
  params.set("cursor", older);
  try {
    const d = await getJSON("/api/audit?" + params.toString());
    for (const r of d.rows) {
      if (!trs.has(r.id)) olderRows++;
      addRow(r, true);
    }
    setOlder(d.next);
  } catch (e) {
    set("status", "older: " + (e.message || e));
  } finally {
    btn.disabled = false;
  }
}

// Marks the Live view painted once (body[data-live=painted] and the performance mark
// toolgate:live-painted); `at` is the frame's time when known.
function painted(at) {
  if (document.body.dataset.live === "painted") return;
  if (at === undefined) performance.mark("toolgate:live-painted");
  else performance.mark("toolgate:live-painted", { startTime: at });
  document.body.dataset.live = "painted";
}

// The frame after now (rows just put in the table by this script).
function paintedNextFrame() {
  requestAnimationFrame(() => setTimeout(() => painted(), 0));
}

// The server-rendered rows were painted before this script ran: each time cell carries
// `elementtiming`, so the frame that painted the last of those in the viewport is known.
// Without Element Timing (or no report within 3 s), the next frame is a late, safe bound.
function markServerRowsPainted() {
  const supported = typeof PerformanceObserver !== "undefined"
    && (PerformanceObserver.supportedEntryTypes || []).includes("element");
  const want = new Set();
  for (const tr of tbody().rows) {
    const r = tr.getBoundingClientRect();
    if (r.bottom > 0 && r.top < window.innerHeight) want.add(tr);
  }
  if (!supported || want.size === 0) {
    paintedNextFrame();
    return;
  }
  let at = 0;
  const obs = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      const tr = e.element && e.element.closest("tr");
      if (e.identifier !== "row" || !tr || !want.has(tr)) continue;
      want.delete(tr);
      at = Math.max(at, e.renderTime || e.startTime);
    }
    if (want.size === 0) {
      obs.disconnect();
      painted(at);
    }
  });
  obs.observe({ type: "element", buffered: true });
  setTimeout(() => {
    obs.disconnect();
    paintedNextFrame();
  }, 3000);
}

// The stream: after `after` (the rows in the table were read at it), or, without it, from
// the stream's own backfill (a filter changed: the table starts empty).
function connect(after) {
  if (source) source.close();
  const params = filterParams();
  if (after === undefined) {
    rows.clear();
    trs.clear();
    olderRows = 0;
    tbody().replaceChildren();
    document.getElementById("detail").hidden = true;
    setOlder("");
    document.body.dataset.live = "filling";
  } else {
    params.set("after", after);
  }
  set("status", "connecting…");
  source = new EventSource("/api/audit/stream?" + params.toString());
  source.addEventListener("open", () => set("status", "live"));
  source.addEventListener("error", () => set("status", "reconnecting…"));
  source.addEventListener("decision", (e) => addRow(JSON.parse(e.data)));
  source.addEventListener("outcome", (e) => updateOutcome(JSON.parse(e.data)));
  source.addEventListener("backfilled", (e) => {
    const d = JSON.parse(e.data);
    setOlder(d.next);
    paintedNextFrame();
  });
}

// Adopts the server-rendered rows and streams on from where they were read.
function startLive() {
  document.body.dataset.live = "filling";
  // The rendered rows below the first screenful (they were kept out of the first frame).
  const more = document.getElementById("more-rows");
  if (more) {
    tbody().append(more.content);
    more.remove();
  }
  for (const tr of tbody().rows) {
    rows.set(tr.dataset.id, null);
    trs.set(tr.dataset.id, tr);
  }
  const state = document.getElementById("live-state").dataset;
  if (state.after === "" || state.after === undefined) {
    connect();
    return;
  }
  setOlder(document.getElementById("older").dataset.before);
  markServerRowsPainted();
  connect(state.after);
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
    const [, h, d] = await Promise.all([
      loadUPlot(),
      getJSON("/api/dashboard/chart?range=hour"),
      getJSON("/api/dashboard/chart?range=day"),
    ]);
    sourceNote("charts-source", h);
    draw("chart-hour", h.series);
    draw("chart-day", d.series);
  }),
};

const charts = {};
let uplot = null;

// uPlot and its stylesheet, loaded once, the first time the Charts view opens.
function loadUPlot() {
  if (window.uPlot) return Promise.resolve();
  if (!uplot) {
    uplot = new Promise((resolve, reject) => {
      const css = document.createElement("link");
      css.rel = "stylesheet";
      css.href = "/vendor/uPlot.min.css";
      document.head.appendChild(css);
      const js = document.createElement("script");
      js.src = "/vendor/uPlot.iife.min.js";
      js.onload = () => resolve();
      js.onerror = () => {
        uplot = null;
        reject(new Error("uPlot did not load"));
      };
      document.head.appendChild(js);
    });
  }
  return uplot;
}

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

// The script is `async` at the end of the body: the document above it is parsed, and
// DOMContentLoaded may or may not have fired yet.
function init() {
  const form = document.getElementById("filters");
  form.addEventListener("submit", (e) => { e.preventDefault(); connect(); });
  const q = new URLSearchParams(location.search);
  for (const el of form.elements) {
    if (el.name && q.has(el.name)) el.value = q.get(el.name);
  }
  document.getElementById("agents-window").addEventListener("change", () => views.agents());
  document.getElementById("tools-window").addEventListener("change", () => views.tools());
  document.getElementById("try-form").addEventListener("submit", tryDecision);
  document.getElementById("older").addEventListener("click", loadOlder);
  tbody().addEventListener("click", (e) => {
    const tr = e.target.closest("tr[data-id]");
    if (tr) showDetail(tr.dataset.id, tr);
  });
  window.addEventListener("hashchange", show);
  // The server-rendered rows paint first; the stream and the other views start after that
  // frame (at once in a hidden tab, which has no frames).
  const start = () => { startLive(); show(); };
  if (document.visibilityState === "hidden") start();
  else requestAnimationFrame(() => setTimeout(start, 0));
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
