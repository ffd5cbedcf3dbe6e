// Cannonade dashboard: signs in with an API key (kept in sessionStorage, sent as a Bearer
// token to this API only) and polls the API as that key. No framework and no build step:
// the DOM is built with textContent (user data is never parsed as HTML) and the charts are
// SVG drawn here.
"use strict";

const KEY_STORAGE = "cannonade.apiKey";
const POLL_MS = 1000;
const OPERATOR_POLL_MS = 5000;
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
let session = null; // {key, user, operator, stops: [functions that end its polling]}

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

async function call(path, key) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${key}` } });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error(body && body.error ? body.error.message : response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

// A signed-in call: a key that stops working (revoked) signs the tab out.
async function api(path) {
  try {
    return await call(path, session.key);
  } catch (error) {
    if (error.status === 401) signOut("Your key is no longer accepted; sign in again.");
    throw error;
  }
}

// Runs `task` now and again `ms` after each run ends (runs never overlap); returns a stop.
function every(ms, task) {
  let timer = null;
  let stopped = false;
  const run = async () => {
    try {
      await task();
      setStatus(`Updated ${new Date().toLocaleTimeString()}`);
    } catch (error) {
      if (!stopped) setStatus(`Could not refresh (${error.message}); retrying…`);
    }
    if (!stopped) timer = setTimeout(run, ms);
  };
  run();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function setStatus(text) {
  $("status").textContent = text;
}

async function signIn(key) {
  let me;
  try {
    me = await call("/v1/dashboard/me", key);
  } catch (error) {
    $("signin-error").textContent =
      error.status === 401 ? "That key was not accepted." : `Sign-in failed: ${error.message}`;
    showSignIn();
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  session = { key, user: me.user, operator: me.operator, stops: [] };
  $("user").textContent = me.user;
  $("operator-badge").hidden = !me.operator;
  $("whoami").hidden = false;
  $("signin").hidden = true;
  $("board").hidden = false;
  $("operator").hidden = !me.operator;
  session.stops.push(every(POLL_MS, refreshBatches), every(POLL_MS, refreshQueues));
  if (me.operator) session.stops.push(every(OPERATOR_POLL_MS, refreshOperator));
}

function signOut(message = "") {
  if (session) session.stops.forEach((stop) => stop());
  session = null;
  sessionStorage.removeItem(KEY_STORAGE);
  $("batches").tBodies[0].replaceChildren();
  $("queues").tBodies[0].replaceChildren();
  $("signin-error").textContent = message;
  showSignIn();
}

function showSignIn() {
  $("whoami").hidden = true;
  $("board").hidden = true;
  $("signin").hidden = false;
  $("key").value = "";
  $("key").focus();
}

// --- batches and queues --------------------------------------------------------------------

function progressBar(counts) {
  const width = 160;
  const total = Math.max(counts.total, 1);
  const done = (width * counts.completed) / total;
  const failed = (width * counts.failed) / total;
  const bar = svg("svg", { class: "progress", width, height: 10, viewBox: `0 0 ${width} 10` });
  bar.append(
    svg("rect", { class: "rest", x: 0, y: 0, width, height: 10, rx: 2 }),
    svg("rect", { class: "done", x: 0, y: 0, width: done, height: 10 }),
    svg("rect", { class: "failed", x: done, y: 0, width: failed, height: 10 }),
  );
  return bar;
}

function batchRow(batch) {
  const counts = batch.request_counts;
  const row = el("tr", {
    "data-batch-id": batch.id,
    "data-status": batch.status,
    "data-completed": counts.completed,
    "data-failed": counts.failed,
    "data-total": counts.total,
  });
  const id = el("td");
  id.append(el("code", { title: batch.id }, batch.id.slice(0, 8)));
  const progress = el("td");
  progress.append(progressBar(counts));
  row.append(
    id,
    el("td", { class: `status status-${batch.status}` }, batch.status.replace("_", " ")),
    progress,
    el("td", { class: "num completed" }, String(counts.completed)),
    el("td", { class: "num failed" }, String(counts.failed)),
    el("td", { class: "num total" }, String(counts.total)),
    el("td", {}, batch.completion_window),
    el("td", {}, new Date(batch.created_at * 1000).toLocaleString()),
  );
  return row;
}

async function refreshBatches() {
  const page = await api("/v1/batches?limit=20");
  if (!session) return;
  $("batches").tBodies[0].replaceChildren(...page.data.map(batchRow));
  $("batches").hidden = page.data.length === 0;
  $("batches-empty").hidden = page.data.length > 0;
}

async function refreshQueues() {
  const queues = await api("/v1/dashboard/queues");
  if (!session) return;
  const rows = queues.data.map((q) => {
    const row = el("tr", { "data-model": q.model });
    row.append(
      el("td", {}, q.model),
      el("td", { class: "num pending" }, String(q.pending)),
      el("td", { class: "num in-flight" }, String(q.in_flight)),
    );
    return row;
  });
  $("queues").tBodies[0].replaceChildren(...rows);
  $("queues").hidden = rows.length === 0;
  $("queues-empty").hidden = rows.length > 0;
}

// --- operator charts ---------------------------------------------------------------------

const CHART = { width: 520, height: 210, left: 44, right: 10, top: 18, bottom: 24 };

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 2.5, 5, 10].map((m) => m * power).find((m) => m >= value);
}

function formatTick(value) {
  return String(Number(value.toPrecision(3)));
}

// The frame shared by both charts: y grid with three ticks, an hour of minutes along x
// (labelled each quarter hour); returns the plot's scales.
function frame(chart, points, yMax) {
  const plotW = CHART.width - CHART.left - CHART.right;
  const plotH = CHART.height - CHART.top - CHART.bottom;
  const x = (i) => CHART.left + (plotW * i) / points.length;
  const y = (v) => CHART.top + plotH - (plotH * v) / yMax;
  for (const tick of [0, yMax / 2, yMax]) {
    chart.append(
      svg("line", { class: "axis", x1: CHART.left, x2: CHART.left + plotW, y1: y(tick), y2: y(tick) }),
      svg("text", { x: CHART.left - 6, y: y(tick) + 3, "text-anchor": "end" }, formatTick(tick)),
    );
  }
  points.forEach((p, i) => {
    if (p.minute % 900 === 0) {
      const label = new Date(p.minute * 1000).toTimeString().slice(0, 5);
      chart.append(svg("text", { x: x(i), y: CHART.height - 6, "text-anchor": "middle" }, label));
    }
  });
  return { x, y, step: plotW / points.length };
}

function newChart(figure, label) {
  const chart = svg("svg", {
    class: "chart",
    viewBox: `0 0 ${CHART.width} ${CHART.height}`,
    role: "img",
    "aria-label": label,
  });
  figure.querySelector("svg")?.remove();
  figure.append(chart);
  return chart;
}

function throughputChart(points) {
  const figure = $("throughput-chart");
  const chart = newChart(figure, "Requests ended per minute, last hour");
  const yMax = niceMax(Math.max(...points.map((p) => p.completed + p.failed)));
  const { x, y, step } = frame(chart, points, yMax);
  const width = Math.max(step - 1, 1);
  points.forEach((p, i) => {
    const time = new Date(p.minute * 1000).toTimeString().slice(0, 5);
    if (p.completed) {
      const bar = svg("rect", { class: "done", x: x(i), y: y(p.completed), width, height: y(0) - y(p.completed) });
      bar.append(svg("title", {}, `${time}: ${p.completed} completed`));
      chart.append(bar);
    }
    if (p.failed) {
      const top = p.completed + p.failed;
      const bar = svg("rect", { class: "failed", x: x(i), y: y(top), width, height: y(p.completed) - y(top) });
      bar.append(svg("title", {}, `${time}: ${p.failed} failed`));
      chart.append(bar);
    }
  });
  legend(chart, [["done", "completed"], ["failed", "failed"]]);
  figure.dataset.completed = points.reduce((sum, p) => sum + p.completed, 0);
  figure.dataset.failed = points.reduce((sum, p) => sum + p.failed, 0);
}

function latencyChart(points) {
  const figure = $("latency-chart");
  const chart = newChart(figure, "Claim to completion latency per minute, last hour");
  const yMax = niceMax(Math.max(0, ...points.map((p) => p.latency_p99_s ?? 0)));
  const { x, y, step } = frame(chart, points, yMax);
  for (const [field, cls] of [["latency_p50_s", "p50"], ["latency_p99_s", "p99"]]) {
    // One path, broken at idle minutes (no latency to show), and a dot per minute so that a
    // lone busy minute shows too.
    let d = "";
    let drawing = false;
    const dots = [];
    points.forEach((p, i) => {
      const value = p[field];
      if (value === null) {
        drawing = false;
        return;
      }
      const [cx, cy] = [(x(i) + step / 2).toFixed(1), y(value).toFixed(1)];
      d += `${drawing ? "L" : "M"}${cx},${cy}`;
      drawing = true;
      const dot = svg("circle", { class: `dot-${cls}`, cx, cy, r: 2.5 });
      dot.append(svg("title", {}, `${new Date(p.minute * 1000).toTimeString().slice(0, 5)}: ${cls} ${value.toFixed(3)} s`));
      dots.push(dot);
    });
    if (d) chart.append(svg("path", { class: cls, d }), ...dots);
  }
  legend(chart, [["legend-p50", "p50"], ["legend-p99", "p99"]]);
  figure.dataset.points = points.filter((p) => p.latency_p50_s !== null).length;
}

function legend(chart, entries) {
  let left = CHART.width - CHART.right - 70 * entries.length;
  for (const [cls, label] of entries) {
    chart.append(
      svg("rect", { class: cls, x: left, y: 4, width: 9, height: 9 }),
      svg("text", { x: left + 13, y: 12 }, label),
    );
    left += 70;
  }
}

async function refreshOperator() {
  const throughput = await api("/v1/dashboard/throughput");
  if (!session) return;
  throughputChart(throughput.data);
  latencyChart(throughput.data);
}

// --- start ---------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    $("signin-error").textContent = "";
    signIn($("key").value.trim());
  });
  $("signout").addEventListener("click", () => signOut());
  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) signIn(saved);
  else showSignIn();
});
