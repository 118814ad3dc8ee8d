// The toolgate dashboard: the Live decisions view. Rows arrive over Server-Sent Events from
// /api/audit/stream, already filtered by policy for this viewer; a row's detail is read from
// /api/audit?id=.. (same policy). Data is only ever set as text, never as HTML.
"use strict";

const MAX_ROWS = 500;
let source = null;
const rows = new Map();

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
}

function latency(us) {
  if (us === null || us === undefined) return "";
  return us >= 1000 ? (us / 1000).toFixed(1) + " ms" : us + " µs";
}

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

function fill(row) {
  const set = (id, text) => { document.getElementById(id).textContent = text; };
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
    document.getElementById("status").textContent = "detail: " + e;
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
  const status = document.getElementById("status");
  status.textContent = "connecting…";
  source = new EventSource("/api/audit/stream?" + params.toString());
  source.addEventListener("open", () => { status.textContent = "live"; });
  source.addEventListener("error", () => { status.textContent = "reconnecting…"; });
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

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("filters");
  form.addEventListener("submit", (e) => { e.preventDefault(); connect(); });
  const q = new URLSearchParams(location.search);
  for (const el of form.elements) {
    if (el.name && q.has(el.name)) el.value = q.get(el.name);
  }
  connect();
});
