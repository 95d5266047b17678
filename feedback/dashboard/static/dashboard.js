// The operator dashboard: reads the admin API with the key kept in sessionStorage, draws with Plotly,
// refreshes every `refresh_s` seconds. No build step; no data in the page until a key is given.
"use strict";

const KEY_ITEM = "servoloop.adminKey";
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const STATE_COLORS = {
  candidate: "#98a2b3", trained: "#1f77b4", canary: "#ff7f0e", active: "#2ca02c", promoted: "#2ca02c",
  approved: "#17becf", rejected: "#7f1d1d", rolled_back: "#d62728", retired: "#667085",
};
const PLOT_CONFIG = { displaylogo: false, responsive: true };
const dash = { refreshes: 0, timer: null, refreshMs: 10000, metric: null, tenant: "", seq: 0, data: {} };
window.servoloopDashboard = dash;

const $ = (id) => document.getElementById(id);
const fmtTime = (ms) => (ms == null ? "" : new Date(ms).toISOString().replace("T", " ").slice(0, 19) + "Z");
const fmtNum = (v, digits = 3) => (v == null ? "" : Number(v).toPrecision(digits).replace(/\.?0+$/, ""));
const label = (model, version) => (version ? `${model}@${version}` : model);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error.message : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${sessionStorage.getItem(KEY_ITEM) || ""}` };
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

function layout(extra = {}) {
  return {
    margin: { l: 50, r: 50, t: 10, b: 40 }, legend: { orientation: "h", y: -0.2 },
    xaxis: { type: "date" }, hovermode: "closest", ...extra,
  };
}

// Bucketed series span the requested window, so one bucket does not stretch over the whole axis.
const windowAxis = (r) => ({ type: "date", range: [r.since_ms, r.until_ms] });

function draw(id, traces, extra = {}) {
  const node = $(id);
  if (!traces.length) {
    Plotly.purge(node);
    node.replaceChildren(el("p", { className: "empty" }, "no data in this window"));
    return;
  }
  if (!node.classList.contains("js-plotly-plot")) node.replaceChildren();
  Plotly.react(node, traces, layout(extra), PLOT_CONFIG);
}

// -- panels --------------------------------------------------------------------------------------------------------

function renderOverview(o) {
  const cells = Object.entries(o.tables).map(([table, t]) =>
    el("div", {}, el("span", { className: "muted" }, table), el("b", {}, t.in_span), `${t.total} in all`));
  if (o.health) cells.push(el("div", {}, el("span", { className: "muted" }, "pipeline"),
    el("b", {}, o.health.sink || o.health.broker || "?"), JSON.stringify(o.health).slice(0, 120)));
  $("overview").replaceChildren(...cells);
}

function renderQuality(m) {
  const metrics = [...new Set(m.series.map((s) => s.metric))].sort();
  const select = $("metric");
  if (!metrics.includes(dash.metric)) dash.metric = metrics[0] || null;
  select.replaceChildren(...metrics.map((name) => el("option", { value: name, selected: name === dash.metric }, name)));
  const traces = [];
  m.series.filter((s) => s.metric === dash.metric).forEach((s, i) => {
    const color = PALETTE[i % PALETTE.length];
    const name = `${label(s.model, s.model_version)}${s.tenant ? " · " + s.tenant : ""} (${s.monitor})`;
    const x = s.points.map((p) => p.t);
    if (s.points.some((p) => p.ci_low != null && p.ci_high != null)) {
      traces.push({ x, y: s.points.map((p) => p.ci_high), mode: "lines", line: { width: 0, color },
        showlegend: false, hoverinfo: "skip", name: `${name} ci_high`, meta: { band: "high", series: name } });
      traces.push({ x, y: s.points.map((p) => p.ci_low), mode: "lines", line: { width: 0, color }, fill: "tonexty",
        fillcolor: color + "33", showlegend: false, hoverinfo: "skip", name: `${name} ci_low`,
        meta: { band: "low", series: name } });
    }
    traces.push({
      x, y: s.points.map((p) => p.value), mode: "lines+markers", name, line: { color },
      marker: { color: s.points.map((p) => (p.status === "alert" ? "#d62728" : color)), size: 7 },
      customdata: s.points.map((p) => [p.sample_size, p.ci_low, p.ci_high, p.status]),
      hovertemplate: "%{y:.4g} (n=%{customdata[0]}, CI %{customdata[1]:.3g}–%{customdata[2]:.3g}) %{customdata[3]}<extra>%{fullData.name}</extra>",
      meta: { series: name, metric: s.metric },
    });
  });
  draw("chart-quality", traces, { yaxis: { title: { text: dash.metric || "" } } });
}

function openReport(url) {
  // Reports need the key too: fetch with it and show the HTML from a blob URL.
  fetch(url, { headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY_ITEM) || ""}` } })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(`HTTP ${r.status}`))))
    .then((blob) => window.open(URL.createObjectURL(blob), "_blank", "noopener"))
    .catch((e) => setStatus(`report: ${e.message}`, true));
}

function renderDrift(d) {
  const groups = new Map();
  for (const f of d.features) {
    const key = label(f.model, f.model_version) + (f.tenant ? ` · ${f.tenant}` : "");
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(f);
  }
  const traces = [...groups.entries()].map(([name, fs], i) => ({
    type: "bar", name, x: fs.map((f) => f.feature), y: fs.map((f) => f.score),
    marker: { color: fs.map((f) => (f.drifted ? "#d62728" : PALETTE[i % PALETTE.length])) },
    customdata: fs.map((f) => [f.threshold, f.method || "", f.drifted ? "drifted" : "no drift"]),
    hovertemplate: "%{x}: %{y:.4g} (threshold %{customdata[0]}, %{customdata[1]}) %{customdata[2]}<extra>%{fullData.name}</extra>",
  }));
  draw("chart-drift", traces, { xaxis: { type: "category" }, barmode: "group", yaxis: { title: { text: "drift score" } } });
  const links = new Map();
  for (const f of d.features) if (f.report_url) links.set(f.report_url, f);
  $("drift-reports").replaceChildren(...[...links.entries()].map(([url, f]) => el("li", {},
    el("a", { href: "#", onclick: (e) => { e.preventDefault(); openReport(url); }, "data-report": url },
      `report: ${label(f.model, f.model_version)} ${fmtTime(f.ts_ms)}`))));
}

function renderGuardrails(g) {
  const traces = g.types.map((t, i) => ({
    x: t.points.map((p) => p.t), y: t.points.map((p) => p.rate), name: t.type, mode: "lines+markers",
    line: { color: PALETTE[i % PALETTE.length] }, customdata: t.points.map((p) => p.count),
    hovertemplate: "%{y:.2%} (%{customdata} verdicts)<extra>%{fullData.name}</extra>",
  }));
  for (const [action, dashStyle] of [["block", "dash"], ["redact", "dot"]]) {
    const points = g.actions[action] || [];
    if (points.some((p) => p.count > 0)) traces.push({
      x: points.map((p) => p.t), y: points.map((p) => p.rate), name: `${action} rate`, mode: "lines",
      line: { dash: dashStyle, color: "#344054" },
    });
  }
  draw("chart-guardrails", traces, { xaxis: windowAxis(g), yaxis: { title: { text: "share of verdicts" }, tickformat: ".0%" } });
}

function renderLatency(l) {
  const latency = [];
  const cost = [];
  l.models.forEach((m, i) => {
    const color = PALETTE[i % PALETTE.length];
    const x = m.points.map((p) => p.t);
    [["p50_ms", "solid"], ["p95_ms", "dash"], ["p99_ms", "dot"]].forEach(([field, dashStyle]) => latency.push({
      x, y: m.points.map((p) => p[field]), name: `${m.model} ${field.replace("_ms", "")}`, mode: "lines+markers",
      line: { color, dash: dashStyle },
    }));
    cost.push({ type: "bar", x, y: m.points.map((p) => p.tokens_in + p.tokens_out), name: `${m.model} tokens`,
      marker: { color, opacity: 0.6 } });
    if (m.points.some((p) => p.cost != null)) cost.push({
      x, y: m.points.map((p) => p.cost), name: `${m.model} cost`, yaxis: "y2", mode: "lines+markers",
      line: { color },
    });
  });
  draw("chart-latency", latency, { xaxis: windowAxis(l), yaxis: { title: { text: "ms" } } });
  draw("chart-cost", cost, {
    xaxis: windowAxis(l),
    yaxis: { title: { text: "tokens" } },
    yaxis2: { title: { text: "cost" }, overlaying: "y", side: "right", rangemode: "tozero" },
  });
}

function renderModels(models, actions) {
  const byState = new Map();
  const triggerPoints = { x: [], y: [], text: [] };
  const rows = [];
  for (const m of models.models) {
    for (const v of m.versions) {
      const y = label(m.model, v.version_id);
      for (const e of v.events) {
        if (!byState.has(e.state)) byState.set(e.state, { x: [], y: [], text: [] });
        const s = byState.get(e.state);
        s.x.push(e.ts_ms); s.y.push(y);
        s.text.push(`${e.state}${e.previous_state ? " ← " + e.previous_state : ""}<br>${e.actor || ""} ${e.reason || ""}`);
      }
      if (v.trigger) {
        triggerPoints.x.push(v.trigger.ts_ms); triggerPoints.y.push(y);
        triggerPoints.text.push(`trigger ${v.trigger.method}: ${v.trigger.reason}`);
      }
      const buttons = actions.map((a) => el("button", {
        type: "button", "data-action": a, "data-model": m.model, "data-version": v.version_id,
        onclick: () => requestAction(a, m.model, v.version_id),
      }, a));
      rows.push(el("tr", { "data-version": v.version_id },
        el("td", {}, m.model), el("td", {}, v.version_id), el("td", {}, v.state || ""),
        el("td", {}, v.requested.join(", ")),
        el("td", {}, v.trigger ? `${v.trigger.method}: ${v.trigger.reason}` : ""),
        el("td", {}, ...(buttons.length ? buttons : [el("span", { className: "muted" }, "read-only")])),
        el("td", {}, el("button", { type: "button", "data-card": v.version_id,
                                    onclick: () => showCard(m.model, v.version_id) }, "card"))));
    }
  }
  const traces = [...byState.entries()].map(([state, s]) => {
    const requested = state.endsWith("_requested");
    return {
      x: s.x, y: s.y, text: s.text, name: state, mode: "markers", hovertemplate: "%{text}<extra></extra>",
      marker: { size: 12, symbol: requested ? "circle-open" : "circle",
                color: STATE_COLORS[state.replace(/_requested$/, "")] || (requested ? "#9467bd" : "#344054") },
    };
  });
  if (triggerPoints.x.length) traces.push({ ...triggerPoints, name: "retrain trigger", mode: "markers",
    hovertemplate: "%{text}<extra></extra>", marker: { size: 14, symbol: "star", color: "#f5b400" } });
  draw("chart-timeline", traces, { yaxis: { type: "category", automargin: true } });
  $("versions").tBodies[0].replaceChildren(...(rows.length ? rows :
    [el("tr", {}, el("td", { colSpan: 7, className: "empty" }, "no model versions yet"))]));
}

// The model card of a version, generated from the registry (GET .../card, feedback/dashboard/release_api.py).
async function showCard(model, version) {
  const box = $("model-card");
  const path = `/admin/v1/models/${encodeURIComponent(model)}/versions/${encodeURIComponent(version)}/card?format=json`;
  try {
    box.textContent = (await api(path)).markdown;
  } catch (e) {
    box.textContent = `model card of ${label(model, version)} failed: ${e.message}`;
  }
  box.hidden = false;
}

const pct = (v) => (v == null ? "–" : `${(100 * v).toFixed(1)}%`);

function renderCanaries(c) {
  const rows = [];
  for (const v of c.canaries) {
    const d = v.decision;
    const verdict = d ? `${d.action}${d.requested ? " (requested)" : d.request_skipped ? ` (${d.request_skipped})` : ""}`
      : "not evaluated yet";
    ["canary", "active"].forEach((name, i) => {
      const a = v.arms[name];
      const cells = [
        el("td", {}, `${name === "canary" ? v.version_id : v.active_version || "?"} · ${name}`),
        el("td", {}, a.requests), el("td", {}, pct(a.error_rate)), el("td", {}, pct(a.block_rate)),
        el("td", {}, pct(a.redact_rate)), el("td", {}, a.latency_p95_ms == null ? "–" : `${fmtNum(a.latency_p95_ms)} ms`),
        el("td", {}, `${pct(a.thumbs_up_rate)} (n=${a.thumbs_n})`),
        el("td", {}, `${a.rating_mean == null ? "–" : fmtNum(a.rating_mean)} (n=${a.rating_n})`),
        el("td", {}, `${pct(a.win_rate)} (n=${a.comparisons})`)];
      if (i === 0) {
        cells.unshift(el("td", { rowSpan: 2 }, label(v.model, v.version_id),
          el("div", { className: "muted" }, `since ${fmtTime(v.since_ms)} · share ${pct(v.canary_share)}`)));
        cells.push(el("td", { rowSpan: 2, className: d ? `decision-${d.action}` : "muted",
          title: d ? d.reasons.join("\n") : "" }, verdict,
          ...(d ? d.reasons.map((r) => el("div", { className: "muted" }, r)) : [])));
      }
      rows.push(el("tr", { "data-canary": `${v.model}@${v.version_id}`, "data-arm": name }, ...cells));
    });
  }
  $("canaries").tBodies[0].replaceChildren(...(rows.length ? rows :
    [el("tr", {}, el("td", { colSpan: 11, className: "empty" }, "no version in canary"))]));
}

function renderTriggers(t) {
  $("triggers").tBodies[0].replaceChildren(...t.triggers.map((r) => el("tr", {},
    el("td", {}, fmtTime(r.ts_ms)), el("td", {}, label(r.model, r.model_version)), el("td", {}, r.method),
    el("td", {}, r.reason), el("td", {}, `${fmtTime(r.window_start_ms)} – ${fmtTime(r.window_end_ms)}`))));
}

function renderAlerts(a) {
  $("alerts").tBodies[0].replaceChildren(...a.alerts.map((r) => el("tr", {},
    el("td", {}, fmtTime(r.ts_ms)), el("td", {}, r.monitor), el("td", {}, r.metric),
    el("td", {}, label(r.model, r.model_version)), el("td", {}, fmtNum(r.value, 4)),
    el("td", {}, fmtNum(r.threshold, 4)), el("td", {}, r.sample_size))));
}

function renderTenants(t) {
  // An operator's key may pick any tenant (or all); a tenant-scoped key sees only its own.
  const names = t.tenants;
  if (!t.all) dash.tenant = names[0] || "";
  else if (dash.tenant && !names.includes(dash.tenant)) names.push(dash.tenant);
  const options = t.all ? [el("option", { value: "", selected: !dash.tenant }, "all tenants")] : [];
  for (const name of names) options.push(el("option", { value: name, selected: name === dash.tenant }, name));
  $("tenant").replaceChildren(...options);
  $("tenant").disabled = !t.all;
}

function renderSpend(s) {
  const traces = s.series.map((series, i) => ({
    x: series.points.map((p) => p.t), y: series.points.map((p) => p.cost_usd), name: series.tenant || "(none)",
    mode: "lines+markers", line: { color: PALETTE[i % PALETTE.length] },
    customdata: series.points.map((p) => [p.requests, p.tokens_in + p.tokens_out]),
    hovertemplate: "%{y:.4g} (%{customdata[0]} requests, %{customdata[1]} tokens)<extra>%{fullData.name}</extra>",
    meta: { tenant: series.tenant, total: series.total_usd },
  }));
  draw("chart-spend", traces, { xaxis: windowAxis(s), yaxis: { title: { text: "spend" }, rangemode: "tozero" } });
  const who = (b) => `${b.scope} ${b.subject}${b.scope === "key" && b.tenant ? ` (${b.tenant})` : ""}`;
  $("budgets").tBodies[0].replaceChildren(...(s.budgets.length ? s.budgets.map((b) => el("tr",
    { "data-budget": `${b.scope}:${b.subject}:${b.period}`, className: `budget-${b.state}` },
    el("td", {}, who(b)), el("td", {}, b.period), el("td", {}, fmtNum(b.spend_usd, 4)),
    el("td", {}, b.soft_usd ? fmtNum(b.soft_usd, 4) : "–"), el("td", {}, b.hard_usd ? fmtNum(b.hard_usd, 4) : "–"),
    el("td", {}, b.state), el("td", {}, fmtTime(b.reset_ms)))) :
    [el("tr", {}, el("td", { colSpan: 7, className: "empty" }, "no budgets set"))]));
  $("budget-alerts").tBodies[0].replaceChildren(...s.alerts.map((a) => el("tr", { "data-alert": a.level },
    el("td", {}, fmtTime(a.ts_ms)), el("td", {}, `${a.scope} ${a.subject} (${a.period})`), el("td", {}, a.level),
    el("td", {}, fmtNum(a.spend_usd, 4)), el("td", {}, fmtNum(a.limit_usd, 4)))));
}

// -- actions and refresh ---------------------------------------------------------------------------------------------

async function requestAction(action, model, version) {
  if (!window.confirm(`${action} ${model}@${version}?`)) return;
  const path = `/admin/v1/models/${encodeURIComponent(model)}/versions/${encodeURIComponent(version)}/${action}`;
  try {
    const r = await api(path, { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ reason: `${action} requested from the dashboard` }) });
    $("action-result").textContent = `${r.action} of ${label(r.model, r.version_id)} requested (event ${r.event_id})`;
    await refresh();
  } catch (e) {
    $("action-result").textContent = `${action} failed: ${e.message}`;
  }
}

async function refresh() {
  if (!sessionStorage.getItem(KEY_ITEM)) return;
  const since = encodeURIComponent($("since").value);
  const seq = ++dash.seq; // a refresh started later (a new tenant or window) wins: this one's answers are dropped
  try {
    const tenants = await api("/admin/v1/tenants");
    if (seq !== dash.seq) return;
    renderTenants(tenants);
    // every panel is read for the selected tenant (none: every tenant)
    const tenant = dash.tenant;
    const t = tenant ? `tenant=${encodeURIComponent(tenant)}` : "";
    const q = (path, withSince = true) => {
      const params = [withSince ? `since=${since}` : "", t].filter(Boolean).join("&");
      return api(params ? `${path}?${params}` : path);
    };
    const [overview, metrics, drift, guardrails, latency, models, triggers, alerts, canaries, spend] = await Promise.all([
      q("/admin/v1/overview"), q("/admin/v1/metrics"), q("/admin/v1/drift"), q("/admin/v1/guardrails"),
      q("/admin/v1/latency"), q("/admin/v1/models", false), q("/admin/v1/triggers"), q("/admin/v1/alerts"),
      q("/admin/v1/canary", false), q("/admin/v1/spend"),
    ]);
    if (seq !== dash.seq) return;
    dash.data = { tenants, overview, metrics, drift, guardrails, latency, models, triggers, alerts, canaries, spend };
    document.body.dataset.tenant = tenant;
    renderOverview(overview); renderQuality(metrics); renderDrift(drift); renderGuardrails(guardrails);
    renderLatency(latency); renderModels(models, models.actions); renderTriggers(triggers); renderAlerts(alerts);
    renderCanaries(canaries); renderSpend(spend);
    dash.refreshes += 1;
    document.body.dataset.refreshes = String(dash.refreshes);
    setStatus(`updated ${new Date().toLocaleTimeString()}${overview.actions_enabled ? "" : " · read-only"}`);
    schedule(overview.refresh_s * 1000);
  } catch (e) {
    if (seq !== dash.seq) return;
    setStatus(e.status === 401 || e.status === 403 ? `key refused: ${e.message}` : `refresh failed: ${e.message}`, true);
    if (e.status === 401 || e.status === 403) stop();
    else schedule(dash.refreshMs);
  }
}

function stop() {
  clearTimeout(dash.timer);
  dash.timer = null;
}

function schedule(ms) {
  dash.refreshMs = ms || dash.refreshMs;
  stop();
  if ($("auto-refresh").checked) dash.timer = setTimeout(refresh, dash.refreshMs);
}

function init() {
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("key").value.trim();
    if (!value) return;
    sessionStorage.setItem(KEY_ITEM, value);
    $("key").value = "";
    setStatus("loading…");
    refresh();
  });
  $("forget").addEventListener("click", () => { sessionStorage.removeItem(KEY_ITEM); stop(); setStatus("enter an admin key"); });
  $("auto-refresh").addEventListener("change", () => ($("auto-refresh").checked ? refresh() : stop()));
  $("since").addEventListener("change", refresh);
  $("tenant").addEventListener("change", () => { dash.tenant = $("tenant").value; refresh(); });
  $("metric").addEventListener("change", () => { dash.metric = $("metric").value; renderQuality(dash.data.metrics); });
  if (sessionStorage.getItem(KEY_ITEM)) { setStatus("loading…"); refresh(); }
}

init();
