// Drive npm mixpanel-browser in real headless Chromium (Debian's, through
// playwright-core) against mixingest, one scenario of page.html per fresh
// browser context, and report what the page saw and what went over the wire.
// Usage: node browser.js '<json config>'; prints one JSON line of results.
// Config: {page: "http://127.0.0.1:P/page.html", origin: "http://127.0.0.1:P",
//          api: "http://127.0.0.1:Q", chromium: "/usr/bin/chromium",
//          scenarios: [{name, token, hide?: true, headers?: {...}}]}; headers are
//          sent with every request of the scenario's context (Playwright's
//          extraHTTPHeaders).  Called by test_sdk_browser.py.
// Playwright's launch() gives Chromium a fresh temporary profile each run.
"use strict";

const { chromium } = require("playwright-core");

const config = JSON.parse(process.argv[2]);
const QUIET_MS = 500;
const SCENARIO_TIMEOUT_MS = 20000;
const contexts = [];

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function runScenario(browser, scenario) {
  const context = await browser.newContext({ extraHTTPHeaders: scenario.headers || {} });
  const page = await context.newPage();
  const requests = [];
  const pending = new Map(); // request -> settle(failure)
  let lastActivity = Date.now();
  const console_ = [];
  page.on("console", (msg) => console_.push(msg.type() + ": " + msg.text()));
  page.on("pageerror", (e) => console_.push("pageerror: " + e.message));

  const isAPI = (url) => url.startsWith(config.api);
  context.on("request", (request) => {
    if (!isAPI(request.url())) {
      if (!request.url().startsWith(config.origin) && !request.url().startsWith("about:")) {
        requests.push({ url: request.url(), foreign: true });
      }
      return;
    }
    const entry = {
      url: request.url().slice(config.api.length),
      method: request.method(),
      resourceType: request.resourceType(),
      requestHeaders: null,
      postData: request.postData(),
      status: null,
      responseHeaders: null,
      failure: null,
    };
    requests.push(entry);
    lastActivity = Date.now();
    request.allHeaders().then((h) => (entry.requestHeaders = h)).catch(() => {});
    const settle = async (failure) => {
      entry.failure = failure;
      const response = failure ? null : await request.response().catch(() => null);
      if (response) {
        entry.status = response.status();
        entry.responseHeaders = await response.allHeaders().catch(() => null);
      }
      pending.delete(request);
      lastActivity = Date.now();
    };
    pending.set(request, settle);
  });
  context.on("requestfinished", (request) => pending.has(request) && pending.get(request)(null));
  context.on("requestfailed", (request) =>
    pending.has(request) && pending.get(request)(request.failure() ? request.failure().errorText : "failed"),
  );

  const url =
    config.page +
    "?scenario=" + encodeURIComponent(scenario.name) +
    "&api=" + encodeURIComponent(config.api) +
    "&token=" + encodeURIComponent(scenario.token);
  await page.goto(url);
  await page.waitForFunction(() => window.__results && window.__results.done, null, {
    timeout: SCENARIO_TIMEOUT_MS,
  });

  // Let the SDK's requests go out and settle.
  const waitQuiet = async (minimum) => {
    const deadline = Date.now() + SCENARIO_TIMEOUT_MS;
    while (Date.now() < deadline) {
      const finished = requests.filter((r) => !r.foreign && (r.status !== null || r.failure)).length;
      if (pending.size === 0 && finished >= minimum && Date.now() - lastActivity >= QUIET_MS) {
        return;
      }
      await sleep(50);
    }
  };
  await waitQuiet(scenario.hide ? 0 : 1);
  const results = await page.evaluate(() => window.__results);
  results.localStorageKeys = await page.evaluate(() => Object.keys(window.localStorage));

  if (scenario.hide) {
    // Navigate away: the document is hidden (visibilitychange) and the SDK
    // flushes its queue with navigator.sendBeacon as the page unloads.
    // Playwright no longer reports requests of the unloaded page: the page
    // notes its beacons in localStorage, read back from a blank page of
    // the same origin, and the queue shows what arrived.
    await page.goto(config.origin + "/blank.html");
    results.beaconsOnHide = await page.evaluate(() =>
      JSON.parse(window.localStorage.getItem("__beacons") || "[]"),
    );
  }
  // The context stays open until every scenario ran, so that a beacon sent
  // while unloading is never cut short.
  contexts.push(context);
  return { results, requests, console: console_ };
}

(async () => {
  const browser = await chromium.launch({
    executablePath: config.chromium,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-dev-shm-usage",
    ],
  });
  const out = { browserVersion: browser.version(), scenarios: {} };
  try {
    for (const scenario of config.scenarios) {
      try {
        out.scenarios[scenario.name] = await runScenario(browser, scenario);
      } catch (e) {
        out.scenarios[scenario.name] = { error: String(e && e.stack ? e.stack : e) };
      }
    }
    for (const context of contexts) {
      await context.close();
    }
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
