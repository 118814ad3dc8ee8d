// Drives the dashboard in a real headless Chromium (playwright-core, the system /usr/bin/chromium)
// for tests/browser.rs: ONE browser for the whole suite, one context per session (viewer), and a
// JSON report on stdout that the Rust test asserts on. Nothing here decides pass or fail except
// a broken run (exit 1): the assertions are in Rust.
//
//   node dashboard.cjs SPEC.json
//
// SPEC: {playwright, chromium, shots, budget_ms, sessions: [{name, base, pending, calls: [{from,
// path, body}], expect_new: [principal, ...], views: [{name, nav, wait, shot}]}]}
// Per session: load `base + "/"` (its HTML already holds the viewer's newest rows), wait for the
// Live view to be painted, read the rows, screenshot, open a row's detail; check the row
// `pending` (a decision id) shows `pending`, print {"await_outcome": name} on a line of its own
// (the Rust side then records that row's outcome) and wait until the row shows it; make `calls`
// through the gateway from their source addresses (the page is not reloaded), wait until a new
// row of each `expect_new` principal shows, read the rows again; click "load older" and read
// the rows it appends; then each extra view: click `nav`, wait for `wait`, read its text,
// screenshot. The last line on stdout is the report.
"use strict";

const fs = require("fs");
const http = require("http");
const path = require("path");

const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const { chromium } = require(path.join(spec.playwright, "playwright-core"));

const started = Date.now();
// Where a session is (printed if the run overruns its budget).
let at = "launch";
const left = () => spec.budget_ms - (Date.now() - started);
setTimeout(() => {
  process.stderr.write(`dashboard.cjs: over its time budget of ${spec.budget_ms} ms, at: ${at}\n`);
  process.exit(2);
}, spec.budget_ms).unref();

// A tools/call through the gateway from `from` (a loopback address the daemon maps to an identity).
function call(base, c) {
  const u = new URL(base + c.path);
  const body = JSON.stringify(c.body);
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: u.hostname, port: u.port, path: u.pathname, method: "POST", localAddress: c.from,
        headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) },
      },
      (res) => {
        let text = "";
        res.on("data", (d) => (text += d));
        res.on("end", () => resolve({ status: res.statusCode, body: text }));
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

// The Live table's rows, as the viewer sees them.
function liveRows(page) {
  return page.$$eval("#decisions tbody tr", (trs) =>
    trs.map((tr) => {
      const c = [...tr.cells].map((td) => td.textContent);
      return {
        id: tr.dataset.id, seq: Number(tr.dataset.seq), kind: c[1], principal: c[2], server: c[4],
        tool: c[5], effect: c[6], outcome: c[7], latency: c[8],
      };
    }),
  );
}

async function session(browser, s) {
  const out = { name: s.name, console_errors: [], page_errors: [], views: {} };
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.on("console", (m) => { if (m.type() === "error") out.console_errors.push(m.text()); });
  page.on("pageerror", (e) => out.page_errors.push(String(e)));
  page.on("response", (r) => { if (r.status() >= 400) out.console_errors.push(`${r.status()} ${r.url()}`); });
  at = `${s.name}: load`;
  const resp = await page.goto(s.base + "/", { timeout: left() });
  out.status = resp ? resp.status() : null;
  // The rows the daemon put in the HTML itself (before any script).
  const html = resp ? await resp.text() : "";
  out.html_rows = html.split("<tr data-id=").length - 1;
  await page.waitForSelector("body[data-live=painted]", { timeout: left() });
  out.uplot_at_load = await page.evaluate(() => typeof window.uPlot);
  out.scripts_at_load = await page.evaluate(() =>
    performance.getEntriesByType("resource").map((e) => e.name).filter((n) => n.endsWith(".js")));
  out.viewer = await page.textContent("#viewer");
  out.painted_ms = await page.evaluate(() => {
    const m = performance.getEntriesByName("toolgate:live-painted")[0];
    return m ? m.startTime : null;
  });
  out.backfill = await liveRows(page);
  await page.screenshot({ path: path.join(spec.shots, `${s.name}-live.png`) });

  at = `${s.name}: detail`;
  // A tools/call row's detail (explain trace, redacted arguments), read from /api/audit?id=.. .
  if (out.backfill.some((r) => r.kind === "mcp")) {
    await page.locator("#decisions tbody tr")
      .filter({ has: page.locator("td:nth-child(2)", { hasText: /^mcp$/ }) })
      .first()
      .click({ timeout: left() });
    await page.waitForSelector("#detail:not([hidden])", { timeout: left() });
    out.detail = {
      id: await page.textContent("#d-id"),
      effect: await page.textContent("#d-effect"),
      explain: await page.textContent("#d-explain"),
      arguments: await page.textContent("#d-arguments"),
    };
    await page.screenshot({ path: path.join(spec.shots, `${s.name}-live-detail.png`) });
  }

  // A row still pending when the page loaded gets its outcome live (an `outcome` event).
  if (s.pending) {
    const cellOf = (id) => page.evaluate((id) => {
      const tr = document.querySelector(`#decisions tbody tr[data-id="${id}"]`);
      return tr ? [tr.querySelector("td.outcome").textContent, tr.querySelector("td.latency").textContent] : null;
    }, id);
    at = `${s.name}: pending outcome`;
    out.pending_before = await cellOf(s.pending);
    process.stdout.write(JSON.stringify({ await_outcome: s.name }) + "\n");
    await page.waitForFunction((id) => {
      const tr = document.querySelector(`#decisions tbody tr[data-id="${id}"]`);
      return tr && tr.querySelector("td.outcome").textContent !== "pending";
    }, s.pending, { timeout: left(), polling: 50 });
    out.pending_after = await cellOf(s.pending);
  }

  at = `${s.name}: live rows`;
  // Live: new decisions appear without a reload. A value set on the window survives only if the
  // page is not reloaded; the navigation entry would change too.
  await page.evaluate(() => { window.__toolgateNoReload = 1; });
  const known = new Set(out.backfill.map((r) => r.id));
  out.calls = [];
  for (const c of s.calls) {
    const r = await call(s.base, c);
    out.calls.push(r.status);
  }
  const t0 = Date.now();
  await page.waitForFunction(
    ({ known, want }) => {
      const fresh = [...document.querySelectorAll("#decisions tbody tr")]
        .filter((tr) => !known.includes(tr.dataset.id))
        .map((tr) => tr.cells[2].textContent);
      return want.every((p) => fresh.includes(p));
    },
    { known: [...known], want: s.expect_new },
    { timeout: left(), polling: 50 },
  );
  out.live_ms = Date.now() - t0;
  out.not_reloaded = await page.evaluate(() => window.__toolgateNoReload === 1);
  out.after = (await liveRows(page)).filter((r) => !known.has(r.id));
  out.all = await liveRows(page);
  await page.screenshot({ path: path.join(spec.shots, `${s.name}-live-new.png`) });

  // "Load older": the next page of older rows is appended below.
  at = `${s.name}: load older`;
  out.older_visible = await page.isVisible("#older");
  if (out.older_visible) {
    // The rows below the bottom one before the click (live rows may arrive on top meanwhile:
    // the /api/audit request is itself audited).
    const bottom = out.all[out.all.length - 1].id;
    await page.click("#older", { timeout: left() });
    await page.waitForFunction((id) => {
      const tr = document.querySelector(`#decisions tbody tr[data-id="${id}"]`);
      return tr && tr.nextElementSibling;
    }, bottom, { timeout: left(), polling: 50 });
    const now = await liveRows(page);
    out.older = now.slice(now.findIndex((r) => r.id === bottom) + 1);
    out.older_then = now;
    await page.screenshot({ path: path.join(spec.shots, `${s.name}-live-older.png`) });
  }

  for (const v of s.views || []) {
    const res = { ok: false };
    at = `${s.name}: view ${v.name}`;
    try {
      await page.click(v.nav, { timeout: left() });
      await page.waitForSelector(v.wait, { state: "visible", timeout: Math.min(left(), 10000) });
      res.text = (await page.innerText(v.root || "main:not([hidden])")).slice(0, 20000);
      await page.screenshot({ path: path.join(spec.shots, `${s.name}-${v.name}.png`) });
      res.ok = true;
    } catch (e) {
      res.error = String(e).slice(0, 2000);
    }
    out.views[v.name] = res;
  }
  // The Charts view loaded uPlot on demand and drew with it.
  out.charts_drawn = await page.evaluate(() => ({
    uplot: typeof window.uPlot,
    canvases: document.querySelectorAll("#chart-hour canvas, #chart-day canvas").length,
  }));
  out.xss = await page.evaluate(() => window.__xss === undefined ? null : window.__xss);
  await context.close();
  return out;
}

(async () => {
  fs.mkdirSync(spec.shots, { recursive: true });
  const t = Date.now();
  const browser = await chromium.launch({
    executablePath: spec.chromium,
    // Root in a container: no user namespaces for Chromium's sandbox.
    args: ["--no-sandbox"],
    timeout: left(),
  });
  const report = { browser: browser.version(), launch_ms: Date.now() - t, sessions: [] };
  try {
    for (const s of spec.sessions) report.sessions.push(await session(browser, s));
  } finally {
    await browser.close();
  }
  report.total_ms = Date.now() - started;
  process.stdout.write(JSON.stringify(report) + "\n");
})().catch((e) => {
  process.stderr.write(`dashboard.cjs: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
