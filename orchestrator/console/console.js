// SecBeat operator console: plain JavaScript over the orchestrator's own JSON API
// (/api/v1/*) and event stream (/api/v1/events). No outside request, no library.
"use strict";

const TOKEN_KEY = "secbeat-token";
const PAGE = 50;
const view = { sort: "id", order: "asc", offset: 0, selector: "", state: "", role: "viewer", detail: null };
// The feed's first connection starts with the latest kept events.
const BACKLOG = 50;
const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (token()) h.Authorization = "Bearer " + token();
  return h;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({}, options, { headers: headers(options && options.headers) }));
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error : response.status + " " + response.statusText;
    throw new Error(message);
  }
  return body;
}

function showError(error) {
  const banner = $("error");
  if (!error) { banner.hidden = true; return; }
  banner.textContent = String(error.message || error);
  banner.hidden = false;
}

function text(tag, content, className) {
  const element = document.createElement(tag);
  element.textContent = content;
  if (className) element.className = className;
  return element;
}

function percent(value) { return value === null || value === undefined ? "–" : (value * 100).toFixed(1) + "%"; }
function ago(time) {
  if (!time) return "–";
  const seconds = Math.max(0, (Date.now() - Date.parse(time)) / 1000);
  return seconds < 90 ? seconds.toFixed(0) + " s ago" : (seconds / 60).toFixed(0) + " min ago";
}

// --- who and where --------------------------------------------------------------

async function loadRole() {
  const ready = await fetch("/readyz").then((r) => r.json()).catch(() => null);
  const standby = $("standby");
  if (ready && ready.role === "standby") {
    standby.replaceChildren(text("span", "This orchestrator is a standby: the fleet is served by the leader "));
    if (ready.leader) {
      const link = document.createElement("a");
      link.href = ready.leader;
      link.textContent = ready.leader;
      standby.append(link);
    } else {
      standby.append(text("span", "(not known yet)"));
    }
    standby.hidden = false;
  } else {
    standby.hidden = true;
  }
  try {
    const who = await api("/api/v1/whoami");
    view.role = who.role;
  } catch (error) {
    view.role = "anonymous";
  }
  $("role").textContent = view.role;
}

// --- fleet at a glance ------------------------------------------------------------

async function loadStats() {
  const stats = await api("/api/v1/fleet/stats");
  const states = $("states");
  states.replaceChildren();
  for (const [state, count] of Object.entries(stats.nodes_by_state)) {
    states.append(text("span", state + " " + count, "state-" + state));
  }
  const figures = [
    ["active nodes", stats.active_nodes],
    ["in service", stats.in_service_nodes],
    ["fleet CPU", percent(stats.avg_cpu_usage)],
    ["disrupted / allowed", stats.disrupted_nodes + " / " + stats.disruption_allowed],
    ["in maintenance", stats.maintenance_nodes],
    ["failures since start", stats.unexpected_failures_total],
    ["webhook outbox", stats.webhook_outbox_depth + (stats.webhook_outbox_depth ? " (oldest " + stats.webhook_outbox_oldest_age_seconds.toFixed(0) + " s)" : "")],
    ["dead letters", stats.webhook_dead_letters_total],
  ];
  const list = $("figures");
  list.replaceChildren();
  for (const [name, value] of figures) { list.append(text("dt", name), text("dd", String(value))); }
  const automation = $("automation");
  automation.replaceChildren();
  for (const [what, paused] of [["healing", stats.healing_paused], ["scaling", stats.scaling_paused]]) {
    automation.append(text("span", what + ": " + (paused ? "PAUSED" : "on"), paused ? "state-failed" : "state-connected"));
    if (view.role === "operator") {
      const button = text("button", paused ? "Resume " + what : "Pause " + what, paused ? "" : "danger");
      button.type = "button";
      button.onclick = () => act("/api/v1/automation", { [what]: paused, reason: "from the console" },
        (paused ? "Resume " : "Pause ") + what + " for the whole fleet?");
      automation.append(button);
    }
  }
  const held = stats.held_failures || [];
  $("held").hidden = held.length === 0;
  $("held-list").replaceChildren(...held.map((failure) => {
    const item = document.createElement("li");
    item.append(text("span", failure.hostname + " (" + failure.node_id.slice(0, 8) + ")", "state-failed"),
      text("span", " — " + failure.reason, "note"));
    return item;
  }));
  const domains = Object.entries(stats.failure_domains || {});
  const table = $("domains");
  table.hidden = domains.length === 0;
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const [name, domain] of domains) {
    const row = body.insertRow();
    for (const cell of [name, domain.active_nodes, domain.in_service_nodes, domain.nodes_by_state.failed || 0,
      percent(domain.avg_cpu_usage), domain.heals_last_hour, domain.healing_budget_left,
      domain.mass_failure_guard ? "HELD" : "–"]) {
      row.insertCell().textContent = String(cell);
    }
  }
}

// --- CPU against prediction -----------------------------------------------------------

async function loadChart() {
  const data = await api("/api/v1/predictions");
  const canvas = $("chart");
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  const points = data.predictions;
  if (points.length === 0) { context.fillText("no scaling check yet", 10, 20); return; }
  const times = points.map((p) => Date.parse(p.timestamp));
  const targets = points.filter((p) => p.target).map((p) => Date.parse(p.target));
  const start = Math.min(...times);
  const end = Math.max(...times, ...targets, start + 1);
  const x = (t) => 40 + ((t - start) / (end - start)) * (width - 50);
  const y = (v) => height - 20 - v * (height - 30);
  context.strokeStyle = "#ccc";
  context.fillStyle = "#444";
  for (const level of [0, 0.25, 0.5, 0.75, 1]) {
    context.beginPath(); context.moveTo(40, y(level)); context.lineTo(width - 10, y(level)); context.stroke();
    context.fillText((level * 100).toFixed(0) + "%", 4, y(level) + 4);
  }
  // Each prediction at its target time, with the +-10 point band shaded by its confidence.
  for (const p of points) {
    if (p.predicted_cpu_usage === null) continue;
    const at = x(Date.parse(p.target));
    context.fillStyle = "rgba(161, 23, 15, " + (0.08 + 0.25 * p.confidence).toFixed(2) + ")";
    context.fillRect(at - 1, y(Math.min(1, p.predicted_cpu_usage + 0.1)), 3, y(Math.max(0, p.predicted_cpu_usage - 0.1)) - y(Math.min(1, p.predicted_cpu_usage + 0.1)));
    context.fillStyle = "#a1170f";
    context.fillRect(at - 1, y(p.predicted_cpu_usage) - 1, 3, 3);
  }
  context.strokeStyle = "#0a4d8c";
  context.lineWidth = 2;
  context.beginPath();
  let started = false;
  for (const p of points) {
    if (p.current_cpu_usage === null) continue;
    const px = x(Date.parse(p.timestamp)), py = y(p.current_cpu_usage);
    if (started) context.lineTo(px, py); else { context.moveTo(px, py); started = true; }
  }
  context.stroke();
  context.lineWidth = 1;
  const accuracy = data.accuracy;
  $("accuracy").textContent = accuracy && accuracy.window > 0
    ? "Blue: fleet CPU. Red: predictions at their target time (band ±10 points, darker = more confident). Scored " + accuracy.scored
      + ": within ±10 points " + percent(accuracy.within_10_ratio) + " (current value: " + percent(accuracy.baseline.within_10_ratio)
      + "), mean error " + percent(accuracy.mean_absolute_error) + " (current value: " + percent(accuracy.baseline.mean_absolute_error) + ")."
    : "Blue: fleet CPU. Red: predictions at their target time (band ±10 points, darker = more confident). No prediction has reached its target yet.";
}

// --- nodes ----------------------------------------------------------------------------

async function loadNodes() {
  const query = new URLSearchParams({ sort: view.sort, order: view.order, limit: String(PAGE), offset: String(view.offset) });
  if (view.selector) query.set("selector", view.selector);
  if (view.state) query.set("state", view.state);
  const data = await api("/api/v1/nodes?" + query);
  const body = $("node-table").tBodies[0];
  body.replaceChildren();
  for (const node of data.nodes) {
    const row = body.insertRow();
    row.tabIndex = 0;
    row.dataset.node = node.node_id;
    const labels = Object.entries(node.labels).map(([k, v]) => k + "=" + v).join(", ");
    const cells = [node.node_id.slice(0, 8), node.hostname, node.ip, node.state, percent(node.last_cpu_usage), ago(node.last_heartbeat), labels];
    cells.forEach((value, i) => {
      const cell = row.insertCell();
      cell.textContent = value;
      if (i === 3) cell.className = "state-" + node.state;
      if (i === 6) cell.className = "labels";
    });
    row.onclick = () => showNode(node.node_id);
    row.onkeydown = (event) => { if (event.key === "Enter") showNode(node.node_id); };
  }
  const last = Math.min(view.offset + PAGE, data.total);
  $("total").textContent = data.total + " nodes";
  $("page").textContent = data.total ? (view.offset + 1) + "–" + last + " of " + data.total : "none";
  $("prev").disabled = view.offset === 0;
  $("next").disabled = last >= data.total;
}

async function showNode(id) {
  view.detail = id;
  const [node, history] = await Promise.all([api("/api/v1/nodes/" + id), api("/api/v1/nodes/" + id + "/events")]);
  const section = $("detail");
  section.hidden = false;
  $("detail-title").textContent = "Node " + node.hostname + " (" + node.node_id + ")";
  const fields = [
    ["state", node.state + (node.state_reason ? " — " + node.state_reason : "")],
    ["ip", node.ip], ["agent", node.agent_version], ["CPU", percent(node.last_cpu_usage)],
    ["connected since", node.connected_since], ["last heartbeat", ago(node.last_heartbeat)],
    ["labels", Object.entries(node.labels).map(([k, v]) => k + "=" + v).join(", ") || "–"],
    ["maintenance", node.maintenance ? node.maintenance.reason : "no"],
    ["drain", node.drain ? node.drain.reason + (node.drain.completed ? " (drained)" : " (draining)") : "no"],
  ];
  const list = $("detail-fields");
  list.replaceChildren();
  for (const [name, value] of fields) { list.append(text("dt", name), text("dd", String(value))); }
  const actions = $("actions");
  actions.replaceChildren();
  if (view.role === "operator") {
    const add = (label, path, body, question, danger) => {
      const button = text("button", label, danger ? "danger" : "");
      button.type = "button";
      button.onclick = () => act("/api/v1/nodes/" + id + "/" + path, body, question);
      actions.append(button);
    };
    if (node.drain) add("Resume", "resume", { reason: "from the console" }, "Return " + node.hostname + " to service?");
    else add("Drain", "drain", { reason: "from the console" }, "Drain " + node.hostname + " (withdraw its route)?");
    add(node.maintenance ? "End maintenance" : "Maintenance", "maintenance",
      { enabled: !node.maintenance, reason: "from the console" },
      (node.maintenance ? "End maintenance of " : "Put in maintenance: ") + node.hostname + "?");
    add("Drain and terminate", "terminate", { reason: "from the console", drain: true }, "Drain, then terminate " + node.hostname + "?", true);
    add("Terminate", "terminate", { reason: "from the console" }, "Terminate " + node.hostname + " now?", true);
  }
  const events = $("detail-events");
  events.replaceChildren(...history.events.slice(-50).reverse().map(eventItem));
}

async function act(path, body, question) {
  if (!window.confirm(question)) return;
  try {
    await api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    showError(null);
    refreshSoon();
  } catch (error) {
    showError(error);
  }
}

// --- live events ---------------------------------------------------------------------

function eventItem(event) {
  const item = document.createElement("li");
  item.append(text("span", event.time.slice(11, 19) + " "), text("span", event.type, "type"));
  if (event.hostname) item.append(text("span", " " + event.hostname + " (" + event.node_id.slice(0, 8) + ")"));
  if (event.reason) item.append(text("span", " — " + event.reason, "note"));
  item.dataset.sequence = event.sequence;
  return item;
}

let lastEventId = null;
let refreshTimer = null;

function refreshSoon() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    refresh();
  }, 500);
}

// Server-sent events read with fetch, so the bearer token goes in a header (an
// EventSource cannot send one). A reconnect sends Last-Event-ID: nothing is lost
// or repeated; "reload" means the id fell out of what is kept.
async function stream() {
  const status = $("stream");
  for (;;) {
    try {
      const extra = lastEventId ? { "Last-Event-ID": lastEventId } : {};
      const path = lastEventId ? "/api/v1/events" : "/api/v1/events?backlog=" + BACKLOG;
      const response = await fetch(path, { headers: headers(extra) });
      if (!response.ok) throw new Error("event stream: " + response.status);
      status.textContent = "live";
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          handle(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (error) {
      // fall through to a reconnect
    }
    status.textContent = "reconnecting";
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function handle(block) {
  let id = null, type = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("id:")) id = line.slice(3).trim();
    else if (line.startsWith("event:")) type = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  // The id is no longer kept (or the backlog reached past this run's first event):
  // list again and follow from now.
  if (type === "reload") { lastEventId = null; refresh(); return; }
  if (type !== "fleet" || !data) return;
  const event = JSON.parse(data);
  lastEventId = id;
  const list = $("events");
  list.prepend(eventItem(event));
  while (list.children.length > 200) list.lastChild.remove();
  refreshSoon();
}

// --- wiring ----------------------------------------------------------------------------

async function refresh() {
  try {
    await Promise.all([loadStats(), loadNodes(), loadChart()]);
    if (view.detail) await showNode(view.detail);
    showError(null);
  } catch (error) {
    showError(error);
  }
}

function wire() {
  $("token-form").onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    start();
  };
  $("forget").onclick = () => { sessionStorage.removeItem(TOKEN_KEY); start(); };
  $("filter").onsubmit = (event) => {
    event.preventDefault();
    view.selector = $("selector").value.trim();
    view.state = $("state").value;
    view.offset = 0;
    loadNodes().then(() => showError(null), showError);
  };
  for (const button of document.querySelectorAll("th button")) {
    button.onclick = () => {
      const sort = button.dataset.sort;
      view.order = view.sort === sort && view.order === "asc" ? "desc" : "asc";
      view.sort = sort;
      loadNodes().catch(showError);
    };
  }
  $("prev").onclick = () => { view.offset = Math.max(0, view.offset - PAGE); loadNodes().catch(showError); };
  $("next").onclick = () => { view.offset += PAGE; loadNodes().catch(showError); };
}

async function start() {
  await loadRole();
  await refresh();
}

wire();
start().then(() => stream());
setInterval(refresh, 15000);
