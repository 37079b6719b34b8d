// Drive the official Node SDK (npm `mixpanel`), unmodified, at mixingest.
// Usage: node node_sdk.js '<json config>'; prints one JSON line of results.
// Config: {http: "127.0.0.1:PORT", https: "127.0.0.1:PORT", token, importToken,
//          secret, weekAgoMs, unusual}, or {locate: {http, token, ip, profileIP}}
//          for the geolocation calls alone.  Called by test_sdk_node.py.
"use strict";

const Mixpanel = require("mixpanel");

const config = JSON.parse(process.argv[2]);
const results = { version: require("mixpanel/package.json").version, errors: {} };

// Every call's callback error, by label: null when the SDK saw success.
function call(label, fn) {
  return new Promise((resolve) => {
    try {
      fn((err) => {
        results.errors[label] = err ? String(err.message || err) : null;
        resolve();
      });
    } catch (e) {
      results.errors[label] = "threw: " + e.message;
      resolve();
    }
  });
}

function batch(n, prefix, time) {
  const events = [];
  for (let i = 0; i < n; i++) {
    events.push({
      event: prefix,
      properties: {
        distinct_id: "u-" + (i % 7),
        n: i,
        // Base64 of this is full of '+' and '/': the SDK posts it unescaped.
        text: config.unusual,
        time: time(i),
      },
    });
  }
  return events;
}

async function overHTTP() {
  const token = config.token;
  const mp = Mixpanel.init(token, { host: config.http, protocol: "http" });
  const now = Date.now();
  await call("track", (cb) =>
    mp.track("Signed Up", { distinct_id: "u-1", text: config.unusual, nested: { a: [1, 2.5] } }, cb),
  );
  await call("track with Date", (cb) =>
    mp.track("Timed", { distinct_id: "u-1", time: new Date(now - 3600 * 1000) }, cb),
  );
  await call("alias", (cb) => mp.alias("u-1", "alias-1", cb));
  await call("track_batch", (cb) =>
    mp.track_batch(
      batch(120, "Batched", (i) => (i % 2 ? new Date(now - i * 1000) : now - i * 1000)),
      (errors) => cb(errors && errors.length ? errors[0] : null),
    ),
  );
  const p = mp.people;
  await call("people.set", (cb) => p.set("u-1", { $name: "Ada", text: config.unusual }, cb));
  await call("people.set one", (cb) => p.set("u-1", "plan", "pro", cb));
  await call("people.set modifiers", (cb) =>
    p.set(
      "u-3",
      { city: "Paris" },
      { $ip: "192.0.2.7", $time: new Date(now - 60000), $ignore_time: true, $latitude: 48.85, $longitude: 2.35 },
      cb,
    ),
  );
  await call("people.set_once", (cb) => p.set_once("u-1", "first_seen", "2024-01-01", cb));
  await call("people.increment", (cb) => p.increment("u-1", { logins: 1, score: -2.5 }, cb));
  await call("people.append", (cb) => p.append("u-1", "pages", "home", cb));
  await call("people.union", (cb) => p.union("u-1", { browsers: ["firefox", "chrome"] }, cb));
  await call("people.remove", (cb) => p.remove("u-1", { browsers: "chrome" }, cb));
  await call("people.unset", (cb) => p.unset("u-1", ["obsolete"], cb));
  await call("people.track_charge", (cb) =>
    p.track_charge("u-1", 19.5, { $time: new Date(now - 60000), sku: "x-1" }, cb),
  );
  await call("people.clear_charges", (cb) => p.clear_charges("u-4", cb));
  await call("people.delete_user", (cb) => p.delete_user("u-2", cb));
  const g = mp.groups;
  await call("groups.set", (cb) => g.set("company", "acme", { name: "Acme", text: config.unusual }, cb));
  await call("groups.set_once", (cb) => g.set_once("company", "acme", "founded", 1999, cb));
  await call("groups.union", (cb) => g.union("company", "acme", { tags: ["a", "b"] }, cb));
  await call("groups.remove", (cb) => g.remove("company", "acme", { tags: "b" }, cb));
  await call("groups.unset", (cb) => g.unset("company", "acme", "obsolete", cb));
  await call("groups.delete_group", (cb) => g.delete_group("company", "gone", cb));

  const test = Mixpanel.init(token, { host: config.http, protocol: "http", test: true, verbose: true });
  await call("test mode", (cb) => test.track("Test Mode", { distinct_id: "u-1" }, cb));
  const geo = Mixpanel.init(token, { host: config.http, protocol: "http", geolocate: true });
  await call("geolocate", (cb) => geo.track("Geolocated", { distinct_id: "u-1" }, cb));

  // The SDK refuses to send a secret over plain http.
  const insecure = Mixpanel.init(config.importToken, {
    host: config.http,
    protocol: "http",
    secret: config.secret,
    logger: quietLogger,
  });
  await call("import over http", (cb) => insecure.import("Never", config.weekAgoMs, { distinct_id: "u-1" }, cb));
}

async function overHTTPS() {
  const token = config.importToken;
  const mp = Mixpanel.init(token, {
    host: config.https,
    protocol: "https",
    secret: config.secret,
    logger: quietLogger,
  });
  const week = config.weekAgoMs;
  await call("import", (cb) =>
    mp.import("Imported", new Date(week), { distinct_id: "u-1", text: config.unusual }, cb),
  );
  await call("import seconds", (cb) => mp.import("Imported Seconds", Math.floor(week / 1000), { distinct_id: "u-1" }, cb));
  await call("import_batch", (cb) =>
    mp.import_batch(
      batch(120, "Imported Batch", (i) => (i % 2 ? new Date(week - i * 1000) : week - i * 1000)),
      (errors) => cb(errors && errors.length ? errors[0] : null),
    ),
  );
  await call("track over https", (cb) => mp.track("Secure Track", { distinct_id: "u-1" }, cb));
  const wrong = Mixpanel.init(token, {
    host: config.https,
    protocol: "https",
    secret: "wrong",
    logger: quietLogger,
  });
  await call("import wrong secret", (cb) => wrong.import("Refused", week, { distinct_id: "u-1" }, cb));
  const account = Mixpanel.init(token, {
    host: config.https,
    protocol: "https",
    credentials: new Mixpanel.ServiceAccountCredentials("svc-user", config.secret, "12345"),
  });
  await call("import service account", (cb) =>
    account.import("Service Account", week, { distinct_id: "u-1" }, cb),
  );
}

// Server-side code gives its user's address: the event's `ip` property and
// a profile update's `$ip` (the SDK itself sends ip=0).
async function locate() {
  const target = config.locate;
  const mp = Mixpanel.init(target.token, { host: target.http, protocol: "http" });
  await call("track", (cb) => mp.track("Located", { distinct_id: "u-1", ip: target.ip }, cb));
  await call("people.set", (cb) => mp.people.set("u-1", { plan: "pro" }, { $ip: target.profileIP }, cb));
}

const quietLogger = {
  trace() {},
  debug() {},
  info() {},
  warn() {},
  error: console.error,
};

(async () => {
  if (config.locate) {
    await locate();
  } else {
    await overHTTP();
    await overHTTPS();
  }
  console.log(JSON.stringify(results));
  // keepAlive agents would hold the process open.
  process.exit(0);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
