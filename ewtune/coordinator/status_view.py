"""The status page's HTML and script: plain HTML and JavaScript, nothing loaded from elsewhere (it works
offline and under a strict Content-Security-Policy). The script polls ``status.json`` every two seconds and
redraws: the run's state and round, one row per holder (its state, certified epsilon spent, the Edgeworth
estimate beside it, budget left, rounds, accuracy so far, or why a holder sent no evaluation) and the recent events, newest first (skips at planning, rounds, why the run stopped).
Every value is written with ``textContent``: reasons sent by holders are never parsed as HTML. The names the
script reads are the fields of :class:`ewtune.coordinator.run_status.RunStatus` (a field absent while it has no
value reads as ``undefined``)."""

from __future__ import annotations

REFRESH_MILLISECONDS = 2000

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ewtune run status</title>
<style>
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
th { background: #f2f2f2; }
.note { color: #555; font-size: 0.9em; }
.bar { background: #9bbb59; height: 0.8em; display: inline-block; }
.spent { background: #c0504d; height: 0.8em; display: inline-block; }
</style></head><body>
<h1>ewtune run <span id="run">-</span></h1>
<p>State: <b id="state">waiting for the run</b>, round <b id="round">-</b>; elapsed <span id="elapsed">-</span>;
updated <span id="updated">never</span> <span class="note">(refreshes every 2 s; read-only)</span></p>
<h2>Holders</h2>
<table id="holders"><thead><tr><th>holder</th><th>state</th><th>records (noised count)</th><th>sigma</th>
<th>certified epsilon in this coordinator's ledger (the guarantee)</th><th>Edgeworth (estimate)</th><th>budget</th><th>budget left</th>
<th>spent / left</th><th>rounds</th><th>accuracy (a causal LM: perplexity, ppl) so far (private, noised by the holder)</th></tr></thead><tbody></tbody></table>
<p class="note">Certified epsilon (and the budget left from it) is what this coordinator's ledger records: every event it
committed for the holder, in all its runs, at the holder's delta. A holder's own lifetime spend (local training,
evaluations, other federations) can be higher and is what its agent enforces: <code>ewtune agent status</code> on its side.</p>
<h2>Recent events</h2>
<ul id="events"></ul>
<script src="status.js"></script>
</body></html>
"""

SCRIPT = """"use strict";
const REFRESH = %(refresh)d;
function cell(row, text) { const td = document.createElement("td"); td.textContent = text; row.appendChild(td); return td; }
function fmt(value, digits) { return (value === null || value === undefined) ? "n/a" : Number(value).toFixed(digits); }
function holderState(holder, skipped) {
  if (skipped) return "skipped: " + skipped;
  if (!holder.active) return "dropped: " + (holder.reason || "");
  return "active";
}
function bar(td, spent, budget) {
  if (!budget) return;
  const width = 120, used = Math.min(1, (spent || 0) / budget);
  const a = document.createElement("span"); a.className = "spent"; a.style.width = Math.round(width * used) + "px";
  const b = document.createElement("span"); b.className = "bar"; b.style.width = Math.round(width * (1 - used)) + "px";
  td.appendChild(a); td.appendChild(b);
}
function missingEvaluations(holder) {
  // each reason a holder gave for sending no evaluation, once, after its rounds (as ewtune.coordinator.run_progress)
  const rounds = new Map();
  const missing = Object.entries(holder.evaluation_missing || {}).sort((x, y) => Number(x[0]) - Number(y[0]));
  for (const [round, reason] of missing) { if (!rounds.has(reason)) rounds.set(reason, []); rounds.get(reason).push(round); }
  return Array.from(rounds, ([reason, list]) => "no evaluation of round" + (list.length > 1 ? "s " : " ") + list.join(", ") + ": " + reason);
}
function events(status) {
  const items = [];
  for (const [holder, reason] of Object.entries(status.skipped || {})) items.push("skipped " + holder + ": " + reason);
  for (const holder of Object.values(status.holders || {})) if (holder.warning) items.push("WARNING: " + holder.warning);
  for (const record of (status.rounds || [])) {
    const outcomes = Object.entries(record.holders || {});
    const committed = outcomes.filter(([, o]) => o.status === "committed").map(([h]) => h);
    const others = outcomes.filter(([, o]) => o.status !== "committed").map(([h, o]) => h + " " + o.status + (o.reason ? " (" + o.reason + ")" : ""));
    items.push("round " + record.round + ": " + committed.length + " update(s) verified and aggregated in " +
      fmt(record.seconds, 1) + " s" + (committed.length ? " from " + committed.join(", ") : "") + (others.length ? "; " + others.join("; ") : ""));
  }
  if (status.reason) items.push("run " + status.state + ": " + status.reason);
  return items.slice(-10).reverse();
}
function render(status) {
  document.getElementById("run").textContent = status.run_id || "-";
  document.getElementById("state").textContent = status.state || "waiting for the run";
  document.getElementById("round").textContent = (status.rounds_completed || 0) + "/" + (status.rounds_planned || "-");
  document.getElementById("elapsed").textContent = status.elapsed_seconds === undefined ? "-" : fmt(status.elapsed_seconds, 0) + " s";
  const body = document.querySelector("#holders tbody");
  body.replaceChildren();
  const holders = status.holders || {};
  const skipped = status.skipped || {};
  const names = Array.from(new Set(Object.keys(holders).concat(Object.keys(skipped)))).sort();
  for (const name of names) {
    const holder = holders[name] || {active: false};
    const row = document.createElement("tr"); row.dataset.holder = name;
    cell(row, name); cell(row, holderState(holder, skipped[name]));
    cell(row, holder.dataset_size === undefined ? "-" : String(holder.dataset_size)); cell(row, fmt(holder.noise_multiplier, 3));
    cell(row, fmt(holder.epsilon_certified, 3)); cell(row, fmt(holder.epsilon_edgeworth_estimate, 3));
    cell(row, fmt(holder.budget_epsilon, 3));
    cell(row, holder.budget_epsilon === undefined ? "n/a" : fmt(Math.max(0, holder.budget_epsilon - (holder.epsilon_certified || 0)), 3));
    bar(cell(row, ""), holder.epsilon_certified, holder.budget_epsilon);
    cell(row, String(holder.rounds_committed || 0));
    const accuracy = Object.entries(holder.accuracy || {}).map(([r, a]) => [r, fmt(a, 3)]);
    const perplexity = Object.entries(holder.perplexity || {}).map(([r, p]) => [r, "ppl " + fmt(p, 1)]);
    const released = accuracy.concat(perplexity).sort((x, y) => Number(x[0]) - Number(y[0]));
    const texts = released.map(([r, text]) => r + ": " + text).concat(missingEvaluations(holder));
    cell(row, texts.length ? texts.join("; ") : "-");
    body.appendChild(row);
  }
  const list = document.getElementById("events");
  list.replaceChildren();
  for (const text of events(status)) { const item = document.createElement("li"); item.textContent = text; list.appendChild(item); }
  document.getElementById("updated").textContent = new Date().toLocaleTimeString();
}
async function refresh() {
  try {
    const response = await fetch("status.json", {cache: "no-store"});
    if (response.ok) render(await response.json());
  } catch (error) { /* the coordinator is restarting or gone: keep the last view */ }
  setTimeout(refresh, REFRESH);
}
refresh();
""" % {"refresh": REFRESH_MILLISECONDS}
