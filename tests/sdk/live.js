// Open mixingest's /live page in headless Chromium (Debian's, through
// playwright-core), then send events while it watches: with npm
// mixpanel-browser from page.html in another tab, and with plain HTTP
// requests from node (curl-style).  Report what the page shows: its rows
// unfiltered, filtered and paused, and a screenshot.
// Usage: node live.js '<json config>'; prints one JSON line of results.
// Config: {live: "http://127.0.0.1:A/live", chromium, screenshot: PATH,
//          sdk: [{url}], requests: [{method, url, headers, body}],
//          late: {method, url, headers, body}, expect: {accepted: N, refused: M},
//          filterToken: TOKEN}.  Called by test_live_page.py.
"use strict";

const { chromium } = require("playwright-core");

const config = JSON.parse(process.argv[2]);
const TIMEOUT_MS = 20000;

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function send(request) {
  const response = await fetch(request.url, {
    method: request.method,
    headers: request.headers || {},
    body: request.body || undefined,
  });
  return { status: response.status, body: await response.text() };
}

// Every row of both tables, as the page shows it.
function rows(page) {
  return page.evaluate(() => {
    const read = (id) =>
      [...document.querySelectorAll("#" + id + " tbody tr")].map((tr) => ({
        kind: tr.dataset.kind,
        token: tr.dataset.token,
        endpoint: tr.dataset.endpoint,
        cells: [...tr.cells].map((td) => td.textContent),
      }));
    return { accepted: read("accepted"), refused: read("refused") };
  });
}

async function settle(page) {
  await sleep(400); // the page renders at most every 100 ms
}

(async () => {
  const browser = await chromium.launch({
    executablePath: config.chromium,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-dev-shm-usage",
    ],
  });
  const out = { console: [], answers: [], foreign: [] };
  try {
    const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
    const live = await context.newPage();
    live.on("console", (msg) => out.console.push(msg.type() + ": " + msg.text()));
    live.on("pageerror", (e) => out.console.push("pageerror: " + e.message));
    live.on("request", (r) => {
      if (!r.url().startsWith(new URL(config.live).origin)) out.foreign.push(r.url());
    });
    await live.goto(config.live);
    await live.waitForFunction(() => document.getElementById("state").textContent.startsWith("live"), null, {
      timeout: TIMEOUT_MS,
    });

    for (const sdk of config.sdk) {
      const page = await context.newPage();
      await page.goto(sdk.url);
      await page.waitForFunction(() => window.__results && window.__results.done, null, {
        timeout: TIMEOUT_MS,
      });
      out.sdkErrors = (out.sdkErrors || []).concat(await page.evaluate(() => window.__results.errors));
    }
    for (const request of config.requests) {
      out.answers.push(await send(request));
    }
    await live.waitForFunction(
      (expect) =>
        document.querySelectorAll("#accepted tbody tr").length >= expect.accepted &&
        document.querySelectorAll("#refused tbody tr").length >= expect.refused,
      config.expect,
      { timeout: TIMEOUT_MS },
    ).catch(() => {});
    await sleep(1200); // one count frame for the chart and the totals
    await settle(live);
    out.all = await rows(live);
    out.totals = await live.evaluate(() =>
      [...document.querySelectorAll("#totals tbody tr")].map((tr) => [...tr.cells].map((td) => td.textContent)),
    );
    out.html = await live.evaluate(() => document.documentElement.outerHTML);
    await live.screenshot({ path: config.screenshot, fullPage: true });

    // Expanding an accepted record pretty-prints it.
    const first = live.locator("#accepted tbody td.record").first();
    await first.click();
    out.expanded = await first.textContent();
    // It stays open while the stream goes on (a counts frame every second).
    await sleep(1500);
    out.expandedAfterFrame = await live.evaluate(() => {
      const td = document.querySelector("#accepted tbody td.record");
      return td.dataset.open === "1" && td.textContent.includes("\n  ");
    });

    await live.selectOption("#token", config.filterToken);
    await settle(live);
    out.byToken = await rows(live);
    await live.selectOption("#outcome", "refused");
    await settle(live);
    out.byTokenRefused = await rows(live);
    await live.selectOption("#token", "");
    await live.selectOption("#outcome", "");
    await live.selectOption("#endpoint", "import");
    await settle(live);
    out.byEndpoint = await rows(live);
    await live.selectOption("#endpoint", "");

    // Paused, the page holds still; resumed, it shows what came meanwhile.
    await live.click("#pause");
    await settle(live);
    const before = await rows(live);
    out.answers.push(await send(config.late));
    await sleep(800);
    out.pausedUnchanged = JSON.stringify(await rows(live)) === JSON.stringify(before);
    await live.click("#pause");
    await settle(live);
    out.resumed = await rows(live);
    await context.close();
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
