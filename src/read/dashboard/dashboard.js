// The dashboard's script: reads the query service's JSON API every 2 s and draws it. Every
// string from the API reaches the page through textContent or an attribute set by
// setAttribute, never as markup (product names and categories come from clients). Served
// under `Content-Security-Policy: default-src 'self'`, so it sets no inline style
// attributes either: classes, and element.style (CSSOM), only.
"use strict";

const REFRESH_MS = 2000;
const FETCH_TIMEOUT_MS = 4000;
const HOURS = 48;
const SVG_NS = "http://www.w3.org/2000/svg";
const MONEY_KEYS = new Set(["totalRevenue", "totalSpent"]);
const ID_KEYS = new Set(["customerId", "productId"]);
// Thresholds for the health cards: above `warn` amber, above `bad` red.
const LAG_SECONDS = { warn: 2, bad: 10 };
const P99_MS = { warn: 1000, bad: 5000 };

const state = { refreshes: 0, failures: 0, lastOk: null, hourly: [], timer: null };

// ---- small DOM helpers ---------------------------------------------------------------

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function byId(id) {
  return document.getElementById(id);
}

// ---- numbers --------------------------------------------------------------------------

// Money as the API printed it: JSON.parse's reviver sees the number's source text where the
// browser supports it, so 12345678901234.56 is shown exactly, not as the nearest double.
// Ids likewise, as their text: a customer id may be any 64-bit integer, and 2^53 + 1 as a
// double would show as its neighbour.
function parseJson(text) {
  return JSON.parse(text, function (key, value, context) {
    const source = context && typeof context.source === "string" ? context.source : null;
    if (MONEY_KEYS.has(key) && typeof value === "number") {
      return { value: value, text: source !== null ? source : value.toFixed(2) };
    }
    if (ID_KEYS.has(key) && typeof value === "number") {
      return source !== null ? source : String(value);
    }
    return value;
  });
}

function groupThousands(digits) {
  return digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

function formatMoney(m) {
  const text = typeof m === "object" && m !== null ? m.text : Number(m).toFixed(2);
  const negative = text.startsWith("-");
  const [whole, frac = ""] = (negative ? text.slice(1) : text).split(".");
  const cents = (frac + "00").slice(0, 2);
  return (negative ? "-" : "") + groupThousands(whole) + "." + cents;
}

// Exact cents of an API amount (its decimal text), for sums that must not drift.
function moneyCents(m) {
  const [whole, frac = ""] = m.text.split(".");
  const cents = BigInt((frac + "00").slice(0, 2));
  return whole.startsWith("-") ? BigInt(whole) * 100n - cents : BigInt(whole) * 100n + cents;
}

function centsText(cents) {
  const negative = cents < 0n;
  const abs = negative ? -cents : cents;
  return (negative ? "-" : "") + String(abs / 100n) + "." + String(abs % 100n).padStart(2, "0");
}

function moneyValue(m) {
  return typeof m === "object" && m !== null ? m.value : Number(m);
}

function formatInt(n) {
  return groupThousands(String(n));
}

function formatMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms < 10 ? ms.toFixed(1) + " ms" : ms < 10000 ? Math.round(ms) + " ms" : (ms / 1000).toFixed(1) + " s";
}

// "6.6 / 8.2 ms" when both are milliseconds, else each with its own unit.
function formatLatencyPair(p50, p99) {
  const a = formatMs(p50);
  const b = formatMs(p99);
  if (a.endsWith(" ms") && b.endsWith(" ms")) return a.slice(0, -3) + " / " + b;
  return a + " / " + b;
}

function hourLabel(date) {
  return date.toISOString().slice(0, 13).replace("T", " ") + ":00";
}

function timestampLabel(iso) {
  return iso ? iso.slice(0, 19).replace("T", " ") : "–";
}

// ---- fetching -------------------------------------------------------------------------

async function getJson(path) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
  try {
    const response = await fetch(path, { signal: controller.signal, cache: "no-store" });
    const text = await response.text();
    if (!response.ok) {
      let message = "HTTP " + response.status;
      try {
        message += ": " + JSON.parse(text).error;
      } catch (e) {
        // Not JSON: the status alone says enough.
      }
      throw new Error(path.split("?")[0] + " answered " + message);
    }
    return parseJson(text);
  } catch (e) {
    if (e.name === "AbortError") throw new Error(path.split("?")[0] + " did not answer within " + FETCH_TIMEOUT_MS / 1000 + " s");
    if (e instanceof TypeError) throw new Error("the query service cannot be reached (" + e.message + ")");
    throw e;
  } finally {
    clearTimeout(timer);
  }
}

function firstHour(now) {
  const start = new Date(now.getTime() - (HOURS - 1) * 3600 * 1000);
  start.setUTCMinutes(0, 0, 0);
  return start;
}

async function refresh() {
  const start = firstHour(new Date());
  const hourlyPath = "/api/analytics/sales/hourly?from=" + encodeURIComponent(start.toISOString());
  const [sync, hourly, products, categories, customers] = await Promise.all([
    getJson("/api/analytics/sync-status"),
    getJson(hourlyPath),
    getJson("/api/analytics/products?sort=revenue&limit=10"),
    getJson("/api/analytics/categories?sort=revenue&limit=100"),
    getJson("/api/analytics/customers?sort=spent&limit=10"),
  ]);
  renderHealth(sync);
  renderHourly(start, hourly.hours);
  renderProducts(products.products);
  renderCategories(categories.categories);
  renderCustomers(customers.customers);
}

async function tick() {
  const started = Date.now();
  try {
    await refresh();
    state.refreshes += 1;
    state.failures = 0;
    state.lastOk = new Date();
    showReachable();
  } catch (e) {
    state.failures += 1;
    showUnreachable(e);
  }
  document.body.dataset.refreshes = String(state.refreshes);
  state.timer = setTimeout(tick, Math.max(0, REFRESH_MS - (Date.now() - started)));
}

// ---- status and banner ----------------------------------------------------------------

function setStatus(text, kind) {
  const status = byId("status");
  status.textContent = text;
  status.className = "status status-" + kind;
}

function showReachable() {
  byId("banner").hidden = true;
  document.body.classList.remove("stale");
  document.body.dataset.state = "ok";
  const problems = Array.from(document.querySelectorAll("#health .card-bad .card-label"), (e) => e.textContent);
  const time = state.lastOk.toISOString().slice(11, 19);
  if (problems.length > 0) setStatus("Attention: " + problems.join(", ") + " · updated " + time + " UTC", "bad");
  else setStatus("Live · updated " + time + " UTC", "ok");
}

function showUnreachable(error) {
  const banner = byId("banner");
  const since = state.lastOk ? " The figures below are from " + state.lastOk.toISOString().slice(11, 19) + " UTC." : "";
  banner.textContent = "The API is unreachable: " + error.message + "." + since + " Retrying every " + REFRESH_MS / 1000 + " s.";
  banner.hidden = false;
  document.body.classList.add("stale");
  document.body.dataset.state = "error";
  setStatus("API unreachable (" + state.failures + (state.failures === 1 ? " attempt)" : " attempts)"), "bad");
}

// ---- health cards ---------------------------------------------------------------------

function level(value, limits) {
  return value > limits.bad ? "bad" : value > limits.warn ? "warn" : "ok";
}

function healthCards(s) {
  const cards = [];
  // A lower bound when a side could not be asked: "≥".
  const atLeast = s.lagIsLowerBound === true ? "≥ " : "";
  cards.push({ label: "lag", value: atLeast + s.lagSeconds.toFixed(1) + " s", sub: atLeast ? "at least: not every side answered" : "oldest unapplied event", kind: level(s.lagSeconds, LAG_SECONDS) });
  if (typeof s.consumerStalled === "boolean") {
    cards.push({ label: "consumer", value: s.consumerStalled ? "stalled" : "running", sub: s.consumerStalled ? "messages wait, nothing applied" : "applying or idle", kind: s.consumerStalled ? "bad" : "ok" });
  }
  if (s.writeSideReachable === false) cards.push({ label: "outbox", value: "unknown", sub: "write DB unreachable", kind: "bad" });
  else cards.push({ label: "pending outbox", value: formatInt(s.pendingOutboxEvents), sub: "events not yet published", kind: "ok" });
  if (s.brokerReachable === false) cards.push({ label: "broker", value: "unknown", sub: "broker unreachable", kind: "bad" });
  else {
    const held = typeof s.pendingConsumerMessages === "number" ? ", " + formatInt(s.pendingConsumerMessages) + " at consumers" : "";
    cards.push({ label: "pending broker", value: formatInt(s.pendingBrokerMessages), sub: "queued" + held, kind: "ok" });
  }
  const latency = s.endToEndLatencyMs || {};
  const p99 = typeof latency.p99 === "number" ? latency.p99 : null;
  cards.push({ label: "latency p50 / p99", value: formatLatencyPair(latency.p50, p99), sub: formatInt(latency.samples || 0) + " events, last " + (latency.windowSeconds || 60) + " s", kind: p99 === null ? "idle" : level(p99, P99_MS) });
  if (typeof s.deadLetterMessages === "number") {
    cards.push({ label: "dead letters", value: formatInt(s.deadLetterMessages), sub: s.deadLetterMessages > 0 ? "see dead-letters list" : "none", kind: s.deadLetterMessages > 0 ? "bad" : "ok" });
  }
  cards.push({ label: "events applied", value: formatInt(s.eventsApplied), sub: s.lastProcessedEventTimestamp ? "newest " + timestampLabel(s.lastProcessedEventTimestamp).slice(5) : "none yet", kind: "idle" });
  return cards;
}

function renderHealth(sync) {
  const box = byId("health");
  const nodes = healthCards(sync).map((c) => {
    const card = el("div", "card card-" + c.kind);
    card.dataset.card = c.label;
    card.append(el("div", "card-label", c.label), el("div", "card-value", c.value), el("div", "card-sub", c.sub));
    return card;
  });
  box.replaceChildren(...nodes);
}

// ---- hourly chart ---------------------------------------------------------------------

function hourSlots(start, hours) {
  const byHour = new Map(hours.map((h) => [Date.parse(h.hour), h]));
  const slots = [];
  for (let i = 0; i < HOURS; i++) {
    const t = start.getTime() + i * 3600 * 1000;
    const h = byHour.get(t);
    slots.push({ date: new Date(t), orders: h ? h.totalOrders : 0, revenue: h ? h.totalRevenue : { value: 0, text: "0.00" } });
  }
  return slots;
}

// A round axis maximum and its tick step: 1, 2, 2.5 or 5 times a power of ten, four ticks.
// A `whole` axis (orders) has whole-number steps, at least 1: 0 to 4 when it is empty.
function niceScale(max, whole) {
  if (!(max > 0)) max = whole ? 4 : 1;
  const rough = max / 4;
  const power = Math.pow(10, Math.floor(Math.log10(rough)));
  const step = [1, 2, 2.5, 5, 10]
    .map((m) => m * power)
    .filter((s) => !whole || Number.isInteger(s))
    .find((s) => s >= rough);
  return { max: step * 4, step: step };
}

// Thousands, millions, billions, trillions.
function shortNumber(n) {
  if (n >= 1e12) return +(n / 1e12).toFixed(1) + "T";
  if (n >= 1e9) return +(n / 1e9).toFixed(1) + "B";
  if (n >= 1e6) return +(n / 1e6).toFixed(1) + "M";
  if (n >= 1e3) return +(n / 1e3).toFixed(1) + "k";
  return String(+n.toFixed(2));
}

function renderHourly(start, hours) {
  state.hourly = hourSlots(start, hours);
  let revenue = 0n;
  let orders = 0;
  for (const h of hours) {
    revenue += moneyCents(h.totalRevenue);
    orders += h.totalOrders;
  }
  byId("hourly-totals").textContent = formatInt(orders) + " orders, revenue " + formatMoney({ text: centsText(revenue) }) + " in the last 48 hours";
  drawChart();
  renderHourlyTable();
}

function renderHourlyTable() {
  const rows = state.hourly
    .slice()
    .reverse()
    .map((s) => tableRow([hourLabel(s.date), formatInt(s.orders), formatMoney(s.revenue)], [null, "num", "num"]));
  byId("hourly-table").tBodies[0].replaceChildren(...rows);
}

function chartGeometry(width) {
  const narrow = width < 560;
  return { width: width, height: narrow ? 220 : 250, left: narrow ? 46 : 64, right: narrow ? 34 : 48, top: 12, bottom: 40, narrow: narrow };
}

function drawAxes(g, root, rev, ord) {
  const plotH = g.height - g.top - g.bottom;
  for (let i = 0; i <= 4; i++) {
    const y = g.top + plotH - (plotH * i) / 4;
    root.append(svg("line", { x1: g.left, x2: g.width - g.right, y1: y, y2: y, class: i === 0 ? "axis" : "grid" }));
    root.append(svg("text", { x: g.left - 6, y: y + 4, class: "tick tick-revenue", "text-anchor": "end" }, shortNumber(rev.step * i)));
    root.append(svg("text", { x: g.width - g.right + 6, y: y + 4, class: "tick tick-orders", "text-anchor": "start" }, shortNumber(ord.step * i)));
  }
  root.append(svg("text", { x: 12, y: g.top + plotH / 2, class: "axis-title", transform: "rotate(-90 12 " + (g.top + plotH / 2) + ")", "text-anchor": "middle" }, "revenue"));
  root.append(svg("text", { x: g.width - 6, y: g.top + plotH / 2, class: "axis-title", transform: "rotate(90 " + (g.width - 6) + " " + (g.top + plotH / 2) + ")", "text-anchor": "middle" }, "orders"));
  root.append(svg("text", { x: g.left + (g.width - g.left - g.right) / 2, y: g.height - 4, class: "axis-title", "text-anchor": "middle" }, "hour (UTC)"));
}

function drawChart() {
  const box = byId("chart");
  // The box's own width, but never wider than the viewport (a table's min-content width
  // must not widen the chart on a phone).
  const viewport = document.documentElement.clientWidth || 900;
  const g = chartGeometry(Math.max(280, Math.min(box.clientWidth || viewport, viewport - 24)));
  const slots = state.hourly;
  const rev = niceScale(Math.max(...slots.map((s) => moneyValue(s.revenue))));
  const ord = niceScale(Math.max(...slots.map((s) => s.orders)), true);
  const root = svg("svg", { width: g.width, height: g.height, viewBox: "0 0 " + g.width + " " + g.height, role: "img", "aria-label": "Revenue and orders per hour, last 48 hours" });
  drawAxes(g, root, rev, ord);
  const plotW = g.width - g.left - g.right;
  const plotH = g.height - g.top - g.bottom;
  const slotW = plotW / slots.length;
  const points = [];
  slots.forEach((s, i) => {
    const x = g.left + i * slotW;
    const barH = (plotH * moneyValue(s.revenue)) / rev.max;
    root.append(svg("rect", { x: x + slotW * 0.15, y: g.top + plotH - barH, width: Math.max(1, slotW * 0.7), height: barH, class: "bar" }));
    points.push([x + slotW / 2, g.top + plotH - (plotH * s.orders) / ord.max]);
    if (s.date.getUTCHours() % (g.narrow ? 12 : 6) === 0) {
      root.append(svg("line", { x1: x + slotW / 2, x2: x + slotW / 2, y1: g.top + plotH, y2: g.top + plotH + 4, class: "axis" }));
      const label = s.date.getUTCHours() === 0 ? s.date.toISOString().slice(5, 10) : String(s.date.getUTCHours()).padStart(2, "0") + ":00";
      root.append(svg("text", { x: x + slotW / 2, y: g.top + plotH + 17, class: "tick", "text-anchor": "middle" }, label));
    }
  });
  root.append(svg("polyline", { points: points.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" "), class: "line" }));
  points.forEach((p) => root.append(svg("circle", { cx: p[0], cy: p[1], r: g.narrow ? 1.8 : 2.5, class: "dot" })));
  slots.forEach((s, i) => root.append(hoverTarget(s, g.left + i * slotW, g.top, slotW, plotH)));
  box.replaceChildren(root);
}

function hourText(s) {
  return hourLabel(s.date) + " UTC: " + formatInt(s.orders) + (s.orders === 1 ? " order" : " orders") + ", revenue " + formatMoney(s.revenue);
}

// A transparent column over each hour: a native tooltip, and the exact figures under the
// chart on hover or tap.
function hoverTarget(s, x, y, w, h) {
  const target = svg("rect", { x: x, y: y, width: w, height: h, class: "hover" });
  target.append(svg("title", {}, hourText(s)));
  const show = () => {
    const tip = byId("chart-tip");
    tip.textContent = hourText(s);
    tip.hidden = false;
  };
  target.addEventListener("mouseenter", show);
  target.addEventListener("click", show);
  return target;
}

// ---- tables ---------------------------------------------------------------------------

function tableRow(cells, classes) {
  const tr = document.createElement("tr");
  cells.forEach((c, i) => {
    const td = el("td", classes && classes[i] ? classes[i] : "");
    if (c instanceof Node) td.append(c);
    else td.textContent = String(c);
    tr.append(td);
  });
  return tr;
}

function emptyRow(columns, text) {
  const td = el("td", "empty", text);
  td.colSpan = columns;
  const tr = document.createElement("tr");
  tr.append(td);
  return [tr];
}

function renderProducts(products) {
  const rows = products.map((p, i) =>
    tableRow([String(i + 1), p.name === null ? "(unnamed)" : p.name, p.category === null ? "–" : p.category, formatInt(p.totalQuantitySold), formatInt(p.orderCount), formatMoney(p.totalRevenue)], ["rank", "name", "cat", "num", "num", "num money"]),
  );
  byId("products").tBodies[0].replaceChildren(...(rows.length ? rows : emptyRow(6, "No products yet.")));
}

function shareBar(fraction) {
  const wrap = el("span", "share");
  const bar = el("span", "share-bar");
  bar.style.width = (100 * fraction).toFixed(1) + "%";
  wrap.append(bar, el("span", "share-text", (100 * fraction).toFixed(1) + "%"));
  return wrap;
}

function renderCategories(categories) {
  const total = categories.reduce((sum, c) => sum + moneyValue(c.totalRevenue), 0);
  const rows = categories.map((c) =>
    tableRow([c.category, formatInt(c.totalOrders), formatMoney(c.totalRevenue), shareBar(total > 0 ? moneyValue(c.totalRevenue) / total : 0)], ["name", "num", "num money", "share-cell"]),
  );
  byId("categories").tBodies[0].replaceChildren(...(rows.length ? rows : emptyRow(4, "No categories yet.")));
  byId("categories-note").textContent = categories.length >= 100 ? "Shares of the revenue of these 100 categories (the largest)." : "";
}

function renderCustomers(customers) {
  const rows = customers.map((c, i) =>
    tableRow([String(i + 1), String(c.customerId), formatInt(c.orderCount), formatMoney(c.totalSpent), timestampLabel(c.lastOrderDate).slice(0, 16)], ["rank", "num", "num", "num money", "num when"]),
  );
  byId("customers").tBodies[0].replaceChildren(...(rows.length ? rows : emptyRow(5, "No customers yet.")));
}

// ---- start ----------------------------------------------------------------------------

let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => state.hourly.length && drawChart(), 150);
});
tick();
