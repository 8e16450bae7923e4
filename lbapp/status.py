"""The status page: one self-contained HTML document (no external asset), filled by its own script.

The script fetches `<this path>?format=json` every 2 s and rewrites the table in place; the
numbers are those of `/metrics` and `/lb-metrics` (see `Metrics.status`).
"""

from __future__ import annotations

STATUS_PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lbapp status</title>
<link rel="icon" href="data:,">
<style>
  :root { color-scheme: light; --ok: #1a7f37; --bad: #cf222e; --muted: #57606a; --line: #d0d7de; }
  body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1f2328; }
  h1 { font-size: 20px; margin: 0 0 4px; }
  #summary { color: var(--muted); margin-bottom: 16px; }
  table { border-collapse: collapse; width: 100%; }
  th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
  th { background: #f6f8fa; font-weight: 600; }
  th:nth-child(-n+3), td:nth-child(-n+3) { text-align: left; }
  td.url { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
  .state { display: inline-block; padding: 1px 8px; border-radius: 10px; color: #fff; font-size: 12px; }
  .healthy { background: var(--ok); } .unhealthy { background: var(--bad); }
  .ejected { background: #d9822b; } .draining { background: #4a78c2; }
  .other { background: var(--muted); }
  #error { color: var(--bad); margin-top: 12px; }
  footer { color: var(--muted); margin-top: 12px; font-size: 12px; }
</style>
</head>
<body>
<h1>lbapp</h1>
<div id="summary">loading&hellip;</div>
<table id="backends" data-filled="0">
  <thead><tr>
    <th>route</th><th>backend</th><th>state</th><th>weight</th><th>in flight</th><th>req/s</th>
    <th>errors</th><th>p50</th><th>p99</th><th>requests (window)</th>
  </tr></thead>
  <tbody></tbody>
</table>
<div id="error"></div>
<footer>Rates and latencies over the last <span id="window">&ndash;</span>; refreshed every 2&nbsp;s.
  Latency: request received to response headers sent.</footer>
<script>
"use strict";
const source = location.pathname + "?format=json";
const dash = "\\u2013";
function ms(v) { return v === null ? dash : (v < 10 ? v.toFixed(2) : v.toFixed(1)) + " ms"; }
function pct(v) { return v === null ? dash : (v * 100).toFixed(v < 0.01 ? 2 : 1) + " %"; }
function num(v) { return v === null ? dash : v.toFixed(v < 10 ? 2 : 1); }
function cell(row, text, cls) {
  const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td;
}
function render(data) {
  const body = document.querySelector("#backends tbody");
  const rows = [];
  for (const b of data.backends) {
    const row = document.createElement("tr");
    row.dataset.url = b.url;
    row.dataset.route = b.route;
    cell(row, b.route, "url");
    cell(row, b.url, "url");
    const badge = document.createElement("span");
    const known = ["healthy", "unhealthy", "ejected", "draining"].includes(b.state);
    badge.className = "state " + (known ? b.state : "other");
    badge.textContent = b.state;
    row.insertCell().appendChild(badge);
    cell(row, String(b.weight));
    cell(row, String(b.in_flight));
    cell(row, num(b.rps));
    cell(row, pct(b.error_rate));
    cell(row, ms(b.p50_ms));
    cell(row, ms(b.p99_ms));
    cell(row, String(Math.round(b.requests)));
    rows.push(row);
  }
  body.replaceChildren(...rows);
  document.getElementById("summary").textContent =
    data.healthy_backends + " of " + data.total_backends + " backends healthy \\u00b7 " +
    data.total_requests + " requests \\u00b7 " + data.in_flight + " in flight \\u00b7 up " +
    Math.round(data.uptime_seconds) + " s \\u00b7 workers: " + data.workers +
    " \\u00b7 " + data.generated_at;
  document.getElementById("window").textContent = Math.round(data.window_seconds) + " s";
  document.getElementById("error").textContent = "";
  document.getElementById("backends").dataset.filled = "1";
}
async function refresh() {
  try {
    const response = await fetch(source, {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (e) {
    document.getElementById("error").textContent = "cannot refresh: " + e.message;
  } finally {
    setTimeout(refresh, 2000);
  }
}
refresh();
</script>
</body>
</html>
"""
