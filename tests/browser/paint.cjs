// Paint speed of the dashboard's Live view (benches/dashboard.rs, scripts/bench-dashboard): one
// headless Chromium, `runs` fresh page loads of `url`, each timed from navigation start to the
// page's `toolgate:live-painted` mark: the frame that first painted the server-rendered rows
// (the page takes it from Element Timing on the rows' cells), or, if the page had to fall back to
// the stream's backfill, the frame after it. Also where the time goes: the HTML's first and last
// byte, first contentful paint, DOMContentLoaded, and when the stream (which now only continues
// after the rendered rows) was created and opened. The figures are taken once the stream is open.
//
//   node paint.cjs '{"playwright": DIR, "chromium": PATH, "url": URL, "runs": N}'
"use strict";

const path = require("path");
const spec = JSON.parse(process.argv[2]);
const { chromium } = require(path.join(spec.playwright, "playwright-core"));

(async () => {
  const browser = await chromium.launch({ executablePath: spec.chromium, args: ["--no-sandbox"] });
  const version = browser.version();
  const runs = [];
  try {
    for (let i = 0; i < spec.runs; i++) {
      // A fresh context each time: no cache, no open stream from the previous load.
      const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
      // Where the time goes: when the page's EventSource was created and opened.
      await context.addInitScript(() => {
        const ES = window.EventSource;
        window.__es = {};
        window.EventSource = function (url) {
          const es = new ES(url);
          const t = window.__es;
          t.created = performance.now();
          es.addEventListener("open", () => { t.open = performance.now(); });
          return es;
        };
      });
      const page = await context.newPage();
      await page.goto(spec.url);
      await page.waitForSelector("body[data-live=painted]", { timeout: 30000 });
      await page.waitForFunction(() => window.__es && window.__es.open, null, { timeout: 30000 });
      // The rows' Element Timing entries (buffered): when the first and the last row was painted.
      const rowPaints = await page.evaluate(() => new Promise((resolve) => {
        const obs = new PerformanceObserver((list) => {
          const t = list.getEntries().filter((e) => e.identifier === "row").map((e) => e.renderTime || e.startTime);
          obs.disconnect();
          resolve(t.length ? [Math.min(...t), Math.max(...t), t.length] : [null, null, 0]);
        });
        obs.observe({ type: "element", buffered: true });
        setTimeout(() => resolve([null, null, 0]), 2000);
      }));
      runs.push(await page.evaluate((rowPaints) => {
        const nav = performance.getEntriesByType("navigation")[0];
        const fcp = performance.getEntriesByName("first-contentful-paint")[0];
        const res = (suffix) => performance.getEntriesByType("resource").find((e) => e.name.endsWith(suffix));
        const css = res("/dashboard.css");
        const js = res("/dashboard.js");
        return {
          css_start_ms: css ? css.startTime : null,
          css_end_ms: css ? css.responseEnd : null,
          js_end_ms: js ? js.responseEnd : null,
          painted_ms: performance.getEntriesByName("toolgate:live-painted")[0].startTime,
          response_start_ms: nav.responseStart,
          response_end_ms: nav.responseEnd,
          first_contentful_paint_ms: fcp ? fcp.startTime : null,
          dom_content_loaded_ms: nav.domContentLoadedEventEnd,
          rows: document.querySelectorAll("#decisions tbody tr").length,
          stream_created_ms: window.__es.created,
          stream_open_ms: window.__es.open,
          first_row_paint_ms: rowPaints[0],
          last_row_paint_ms: rowPaints[1],
          row_paints: rowPaints[2],
        };
      }, rowPaints));
      await context.close();
    }
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify({ browser: version, runs }) + "\n");
})().catch((e) => {
  process.stderr.write(`paint.cjs: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
