// syncworker dashboard. Plain JS, no build step, no library.
// Every piece of data goes into the page as text (textContent, never
// innerHTML), so a job name, a reason or an error cannot become markup.
"use strict";

const TOKEN_KEY = "syncworker.token";
const RUNS_PAGE = 25;
const FINISHED = ["succeeded", "failed", "cancelled", "skipped"];

const state = {
  status: null,       // /api/status
  runs: [],           // the runs table, newest first
  cursor: null,       // next_cursor of the last page read
  progress: new Map(), // run id -> {processed, total, step}, from run_progress events
  detail: null,       // the run shown in the side panel, by id
  pauseJob: null,
  scopeChoice: new Map(), // job -> the scope picked for Run now, kept across redraws
};

// -- small helpers -----------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const $ = (id) => document.getElementById(id);

function pill(status, text) {
  return el("span", { class: `pill ${status}` }, text || status);
}

function span(seconds) {
  const s = Math.abs(seconds);
  if (s < 60) return `${Math.round(s)}s`;
  if (s < 3600) return `${Math.round(s / 60)}m`;
  if (s < 86400) return `${(s / 3600).toFixed(1)}h`;
  return `${(s / 86400).toFixed(1)}d`;
}

function ago(iso) {
  if (!iso) return "never";
  const seconds = (Date.now() - Date.parse(iso)) / 1000;
  return seconds >= 0 ? `${span(seconds)} ago` : `in ${span(seconds)}`;
}

function stamp(iso) {
  if (!iso) return "";
  return new Date(iso).toLocaleString(undefined, {
    month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
}

function when(iso) {
  // A relative time that stays current (see tick()), the exact one on hover.
  if (!iso) return el("span", { class: "muted" }, "–");
  return el("span", { title: new Date(iso).toString(), dataset: { ago: iso } }, ago(iso));
}

function inZone(iso, zone) {
  // The job's own clock: a schedule is read in its time zone.
  try {
    return new Date(iso).toLocaleString(undefined, {
      timeZone: zone, month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
    });
  } catch (err) {
    return stamp(iso); // a zone this browser does not know
  }
}

function duration(ms) {
  if (ms === null || ms === undefined) return "";
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function number(n) {
  return n === null || n === undefined ? "" : Number(n).toLocaleString();
}

function records(run) {
  const done = number(run.records_processed);
  const main = run.records_total !== null && run.records_total !== undefined
    ? `${done} / ${number(run.records_total)}` : done;
  const extra = [["inserted", "+"], ["updated", "~"], ["deleted", "−"], ["errored", "!"]]
    .filter(([name]) => run[`records_${name}`])
    .map(([name, sign]) => `${sign}${number(run[`records_${name}`])}`);
  return el("span", { title: "processed (+inserted ~updated −deleted !errored)" },
    main, extra.length ? el("span", { class: "sub" }, extra.join(" ")) : null);
}

function firstLine(text, max) {
  const line = (text || "").split("\n")[0];
  return line.length > max ? line.slice(0, max - 1) + "…" : line;
}

function toast(message, bad) {
  const node = el("div", { class: bad ? "toast bad" : "toast", role: "status" }, message);
  $("toasts").append(node);
  setTimeout(() => node.remove(), bad ? 6000 : 3500);
}

function clear(node) {
  while (node.firstChild) node.firstChild.remove();
  return node;
}

function emptyRow(table, colspan, text) {
  return el("tr", {}, el("td", { class: "empty", colspan }, text));
}

// -- the API -----------------------------------------------------------------------

async function getJSON(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function post(path, body) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) {
    toast("Enter the API token (top right) to use the buttons.", true);
    $("token").focus();
    return null;
  }
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
    body: JSON.stringify(body || {}),
  });
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) {
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showToken();
    }
    toast(data.error || `HTTP ${response.status}`, true);
    return null;
  }
  return data;
}

const api = {
  trigger: (job, scope) =>
    post(`/api/jobs/${encodeURIComponent(job)}/trigger`, scope ? { scope } : {}),
  pause: (job, body) => post(`/api/jobs/${encodeURIComponent(job)}/pause`, body),
  resume: (job, scope) =>
    post(`/api/jobs/${encodeURIComponent(job)}/resume`, scope ? { scope } : {}),
  cancel: (id) => post(`/api/runs/${encodeURIComponent(id)}/cancel`, { reason: "from the dashboard" }),
};

// -- reading -----------------------------------------------------------------------

async function loadStatus() {
  try {
    state.status = await getJSON("/api/status");
  } catch (err) {
    toast(`status: ${err.message}`, true);
    return;
  }
  drawSummary();
  drawWorkers();
  drawJobs();
  drawRunning();
  fillJobFilter();
}

function runsQuery(before) {
  const params = new URLSearchParams({ limit: String(RUNS_PAGE) });
  const job = $("filter-job").value;
  const status = $("filter-status").value;
  if (job) params.set("job", job);
  if (status) params.set("status", status);
  if (before) params.set("before", before);
  return `/api/runs?${params}`;
}

async function loadRuns() {
  try {
    const page = await getJSON(runsQuery(null));
    // Keep the older pages the user opened: replace only the newest rows.
    const oldest = page.runs.length ? page.runs[page.runs.length - 1].id : Infinity;
    const kept = state.runs.length > RUNS_PAGE ? state.runs.filter((r) => r.id < oldest) : [];
    state.runs = page.runs.concat(kept);
    if (!kept.length) state.cursor = page.next_cursor;
  } catch (err) {
    toast(`runs: ${err.message}`, true);
    return;
  }
  drawRuns();
}

async function loadOlder() {
  if (!state.cursor) return;
  const page = await getJSON(runsQuery(state.cursor));
  state.runs = state.runs.concat(page.runs);
  state.cursor = page.next_cursor;
  drawRuns();
}

async function loadDetail(id) {
  try {
    state.detail = await getJSON(`/api/runs/${encodeURIComponent(id)}`);
  } catch (err) {
    toast(err.message, true);
    return;
  }
  drawDetail();
}

// -- drawing -----------------------------------------------------------------------

function drawSummary() {
  const s = state.status.summary || {};
  const cards = [
    ["total", "runs", ""],
    ["succeeded", "succeeded", "ok"],
    ["failed", "failed", "bad"],
    ["running", "running", "run"],
    ["pending", "pending", "wait"],
  ];
  const box = clear($("summary"));
  for (const [key, label, tone] of cards) {
    box.append(el("div", { class: `card ${tone}`, dataset: { summary: key } },
      el("div", { class: "value" }, number(s[key] || 0)), el("div", { class: "label" }, label)));
  }
  box.append(el("div", { class: "card" },
    el("div", { class: "value" }, s.last_success_at ? when(s.last_success_at) : "never"),
    el("div", { class: "label" }, "last success")));
}

function drawWorkers() {
  const body = clear($("workers").tBodies[0]);
  const workers = state.status.workers;
  if (!workers.length) {
    body.append(emptyRow(body, 7, "No worker has registered yet."));
    return;
  }
  for (const w of workers) {
    const runs = (w.current_runs || []).map((id) =>
      el("button", { type: "button", class: "link mono", onclick: () => loadDetail(id) }, `#${id}`));
    body.append(el("tr", { dataset: { worker: w.id } },
      el("td", { class: "mono" }, w.id),
      el("td", {}, w.hostname),
      el("td", { class: "num" }, w.pid),
      el("td", { class: "muted" }, w.version),
      el("td", {}, pill(w.state)),
      el("td", {}, when(w.heartbeat_at)),
      el("td", {}, runs.length ? runs : el("span", { class: "muted" }, "–"))));
  }
}

function holdText(hold) {
  const parts = [`by ${hold.paused_by}`];
  if (hold.paused_until) parts.push(`until ${stamp(hold.paused_until)}`);
  if (hold.paused_reason) parts.push(`“${hold.paused_reason}”`);
  return parts.join(", ");
}

function drawJobs() {
  const body = clear($("jobs").tBodies[0]);
  const jobs = state.status.jobs;
  if (!jobs.length) {
    body.append(emptyRow(body, 6, "No jobs: add [jobs.NAME] to the config and reload."));
    return;
  }
  for (const job of jobs) {
    const words = job.schedule_words && job.schedule_words.length ? job.schedule_words : job.schedule;
    const schedule = words.length
      ? el("span", { title: job.schedule.join(" | ") }, words.join("; "),
        el("span", { class: "sub" }, job.timezone))
      : el("span", { class: "muted" }, "on trigger only");
    const last = job.last_run_id
      ? el("span", {}, pill(job.last_status), " ",
        el("button", { type: "button", class: "link mono", onclick: () => loadDetail(job.last_run_id) },
          `#${job.last_run_id}`))
      : el("span", { class: "muted" }, "never ran");
    const states = [];
    if (!job.enabled) states.push(pill("disabled"));
    // Each hold is lifted on its own (a job's and a scope's are separate).
    const resume = (scope) => el("button", {
      type: "button", class: "link", dataset: { action: "resume", job: job.name, scope: scope || "" },
      onclick: async () => {
        const done = await api.resume(job.name, scope);
        if (done) toast(`${job.name}${scope ? "/" + scope : ""} resumed`);
        refreshSoon();
      },
    }, "resume");
    if (job.paused) {
      states.push(el("div", {}, pill("paused"), " ", resume(null),
        el("span", { class: "sub" }, holdText(job))));
    }
    for (const hold of job.paused_scopes || []) {
      states.push(el("div", {}, pill("paused", `${hold.scope} paused`), " ", resume(hold.scope),
        el("span", { class: "sub" }, holdText(hold))));
    }
    if (!states.length) states.push(el("span", { class: "muted" }, "active"));

    const scopes = job.scopes || [];
    const scopeSelect = scopes.length
      ? el("select", {
        "aria-label": `scope of ${job.name}`, dataset: { scopeFor: job.name },
        onchange: (event) => state.scopeChoice.set(job.name, event.target.value),
      }, el("option", { value: "" }, "all scopes"), scopes.map((s) => el("option", { value: s }, s)))
      : null;
    // A live redraw keeps the scope the user picked.
    if (scopeSelect && scopes.includes(state.scopeChoice.get(job.name))) {
      scopeSelect.value = state.scopeChoice.get(job.name);
    }
    const actions = el("td", { class: "actions" },
      scopeSelect,
      el("button", {
        type: "button", class: "primary", disabled: !job.enabled, dataset: { action: "run", job: job.name },
        onclick: async () => {
          const scope = scopeSelect ? scopeSelect.value : "";
          const done = await api.trigger(job.name, scope);
          if (done) toast(`${job.name}${scope ? "/" + scope : ""}: run ${done.run_ids.map((i) => "#" + i).join(", ")} queued`);
          refreshSoon();
        },
      }, "Run now"),
      el("button", {
        type: "button", class: "warn", dataset: { action: "pause", job: job.name },
        onclick: () => openPause(job),
      }, "Pause"));
    body.append(el("tr", { dataset: { job: job.name } },
      el("td", {}, el("span", { class: "job-name" }, job.name),
        scopes.length ? el("span", { class: "sub" }, scopes.join(", ")) : null),
      el("td", {}, schedule),
      el("td", {}, when(job.next_fire_at),
        job.next_fire_at ? el("span", { class: "sub" }, inZone(job.next_fire_at, job.timezone)) : null),
      el("td", {}, last),
      el("td", {}, states),
      actions));
  }
}

function live(run) {
  // A running run's counters as its last run_progress event said.
  const seen = run.status === "running" ? state.progress.get(run.id) : null;
  if (!seen) return run;
  return { ...run, records_processed: seen.processed, records_total: seen.total };
}

function runLabel(run) {
  return run.scope ? `${run.job} / ${run.scope}` : run.job;
}

function drawRunning() {
  const box = clear($("running"));
  const running = (state.status.runs || []).filter((r) => r.status === "running");
  if (!running.length) {
    box.append(el("div", { class: "empty" }, "Nothing running. Runs appear here live, with their progress."));
    return;
  }
  for (const run of running) box.append(progressCard(run));
}

function progressCard(run) {
  const live = state.progress.get(run.id) || {};
  const processed = live.processed ?? run.records_processed;
  const total = live.total ?? run.records_total;
  const step = live.step ?? run.current_step;
  const known = total !== null && total !== undefined && total > 0;
  const share = known ? Math.min(100, Math.max(0, (100 * processed) / total)) : 0;
  const bar = el("div", { class: known ? "bar" : "bar unknown", role: "progressbar",
    "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": known ? Math.round(share) : null },
  el("span", {}));
  if (known) bar.firstChild.style.width = `${share}%`;
  return el("div", { class: "progress-card", dataset: { run: run.id } },
    el("div", { class: "row" },
      el("span", { class: "what" }, runLabel(run)),
      el("span", { class: "actions" },
        el("button", { type: "button", class: "link mono", onclick: () => loadDetail(run.id) }, `#${run.id}`),
        el("button", { type: "button", class: "danger", dataset: { action: "cancel", run: run.id },
          onclick: () => cancelRun(run.id) }, "Cancel"))),
    bar,
    el("div", { class: "row counts" },
      el("span", { dataset: { counts: run.id } },
        known ? `${number(processed)} / ${number(total)} (${Math.floor(share)}%)` : `${number(processed)} records`),
      el("span", {}, step ? `step ${step}` : "", " · started ", when(run.started_at))));
}

async function cancelRun(id) {
  const done = await api.cancel(id);
  if (done) toast(`run #${id}: ${done.status === "cancelled" ? "cancelled" : "cancel requested"}`);
  refreshSoon();
}

function drawRuns() {
  const body = clear($("runs").tBodies[0]);
  if (!state.runs.length) {
    const filtered = $("filter-job").value || $("filter-status").value;
    body.append(emptyRow(body, 11, filtered
      ? "No runs match these filters."
      : "No runs yet. Press Run now on a job, or wait for its schedule."));
  }
  for (const run of state.runs) {
    const selected = state.detail && state.detail.id === run.id;
    const cancel = FINISHED.includes(run.status) ? null
      : el("button", { type: "button", class: "danger", dataset: { action: "cancel", run: run.id },
        onclick: (event) => { event.stopPropagation(); cancelRun(run.id); } }, "Cancel");
    body.append(el("tr", {
      class: selected ? "selected" : null, dataset: { run: run.id }, onclick: () => loadDetail(run.id),
    },
    el("td", { class: "num mono" }, `#${run.id}`),
    el("td", {}, run.job),
    el("td", {}, run.scope || el("span", { class: "muted" }, "–")),
    el("td", {}, pill(run.status)),
    el("td", {}, run.source),
    el("td", {}, run.triggered_by || ""),
    el("td", {}, when(run.requested_at)),
    el("td", { class: "num" }, duration(run.duration_ms)),
    el("td", { dataset: { records: run.id } }, records(live(run))),
    el("td", { class: "error-text", title: run.error || "" }, firstLine(run.error, 90)),
    el("td", { class: "actions" }, cancel)));
  }
  $("older").hidden = !state.cursor;
}

function drawDetail() {
  const run = state.detail;
  if (!run) return;
  $("detail").hidden = false;
  $("detail-title").textContent = `Run #${run.id} · ${runLabel(run)}`;
  const fields = [
    ["status", pill(run.status)],
    ["source", run.source],
    ["triggered by", run.triggered_by || "–"],
    ["requested", stamp(run.requested_at)],
    ["scheduled for", run.scheduled_for ? stamp(run.scheduled_for) : "–"],
    ["started", run.started_at ? stamp(run.started_at) : "–"],
    ["finished", run.finished_at ? stamp(run.finished_at) : "–"],
    ["duration", duration(run.duration_ms) || "–"],
    ["attempt", `${run.attempt} of ${run.max_attempts}`],
    ["worker", run.worker_id || "–"],
    ["records", records(run)],
  ];
  const body = clear($("detail-body"));
  body.append(el("dl", { class: "kv" }, fields.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])));
  if (!FINISHED.includes(run.status)) {
    body.append(el("button", { type: "button", class: "danger", dataset: { action: "cancel", run: run.id },
      onclick: () => cancelRun(run.id) }, "Cancel this run"));
  }
  if (run.error) body.append(el("h2", {}, "Error"), el("pre", { class: "error-block" }, run.error));
  if (run.payload && Object.keys(run.payload).length) {
    body.append(el("h2", {}, "Payload"), el("pre", { class: "mono" }, JSON.stringify(run.payload, null, 2)));
  }
  body.append(el("h2", {}, "Steps"));
  const steps = el("table", { class: "grid", id: "steps" },
    el("thead", {}, el("tr", {}, ["#", "Step", "Status", "Duration", "Records", "Error"].map((h) => el("th", {}, h)))),
    el("tbody", {}, run.steps.length ? run.steps.map((st) => el("tr", {},
      el("td", { class: "num muted" }, run.max_attempts > 1 ? `${st.attempt}.${st.position + 1}` : st.position + 1),
      el("td", { class: "mono" }, st.name),
      el("td", {}, pill(st.status)),
      el("td", { class: "num" }, duration(st.duration_ms)),
      el("td", {}, records(st)),
      el("td", { class: "error-text", title: st.error || "" }, firstLine(st.error, 60)))) : emptyRow(null, 6, "No step has started.")));
  body.append(steps);
  for (const row of $("runs").tBodies[0].rows) {
    row.classList.toggle("selected", row.dataset.run === String(run.id));
  }
}

function fillJobFilter() {
  const select = $("filter-job");
  const names = state.status.jobs.map((j) => j.name);
  const have = [...select.options].slice(1).map((o) => o.value);
  if (names.join("\n") === have.join("\n")) return;
  const chosen = select.value;
  while (select.options.length > 1) select.options[1].remove();
  for (const name of names) select.append(el("option", { value: name }, name));
  select.value = names.includes(chosen) ? chosen : "";
}

// -- pause dialog ------------------------------------------------------------------

function openPause(job) {
  state.pauseJob = job;
  $("pause-title").textContent = `Pause ${job.name}`;
  const scope = clear($("pause-scope"));
  scope.append(el("option", { value: "" }, "the whole job"));
  for (const s of job.scopes || []) scope.append(el("option", { value: s }, s));
  $("pause-reason").value = "";
  $("pause-dialog").hidden = false;
  $("pause-reason").focus();
}

async function confirmPause() {
  const job = state.pauseJob;
  const body = {};
  if ($("pause-scope").value) body.scope = $("pause-scope").value;
  if ($("pause-reason").value.trim()) body.reason = $("pause-reason").value.trim();
  const seconds = Number($("pause-for").value);
  if (seconds) body.until = new Date(Date.now() + seconds * 1000).toISOString();
  $("pause-dialog").hidden = true;
  const done = await api.pause(job.name, body);
  if (done) toast(`${job.name}${body.scope ? "/" + body.scope : ""} paused`);
  refreshSoon();
}

// -- the token ---------------------------------------------------------------------

function showToken() {
  const has = Boolean(sessionStorage.getItem(TOKEN_KEY));
  $("token").hidden = has;
  $("token-save").hidden = has;
  $("token-forget").hidden = !has;
  $("token-state").textContent = has ? "token set for this tab" : "";
}

function saveToken() {
  const value = $("token").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token").value = "";
  showToken();
}

// -- live updates ------------------------------------------------------------------

let refreshTimer = null;
let refreshedAt = 0;

function refreshSoon() {
  // Events are hints to read again: a burst makes one read a moment after
  // its first event, and however many arrive (any role may NOTIFY the
  // channel), a page reads at most once a second.
  if (refreshTimer) return;
  const wait = Math.max(150, 1000 - (Date.now() - refreshedAt));
  refreshTimer = setTimeout(async () => {
    refreshTimer = null;
    refreshedAt = Date.now();
    await Promise.all([loadStatus(), loadRuns()]);
    if (state.detail) await loadDetail(state.detail.id);
  }, wait);
}

function onProgress(event) {
  const data = JSON.parse(event.data);
  state.progress.set(data.run_id, {
    processed: data.records_processed, total: data.records_total, step: data.step,
  });
  const card = document.querySelector(`.progress-card[data-run="${Number(data.run_id)}"]`);
  if (!card || !state.status) {
    refreshSoon(); // a run this page has not seen start
    return;
  }
  const run = state.status.runs.find((r) => r.id === data.run_id);
  if (run) card.replaceWith(progressCard(run));
  const cell = document.querySelector(`td[data-records="${Number(data.run_id)}"]`);
  const row = state.runs.find((r) => r.id === data.run_id);
  if (cell && row) clear(cell).append(records(live(row)));
}

function connect() {
  const source = new EventSource("/api/events");
  const live = $("live");
  source.onopen = () => {
    live.dataset.state = "live";
    live.textContent = "live";
    refreshSoon(); // whatever happened while the stream was down
  };
  source.onerror = () => {
    live.dataset.state = "down";
    live.textContent = "reconnecting";
  };
  for (const name of ["run_started", "run_succeeded", "run_failed", "run_cancelled", "resync"]) {
    source.addEventListener(name, (event) => {
      if (name !== "resync") {
        const data = JSON.parse(event.data);
        if (FINISHED.includes(data.status)) state.progress.delete(data.run_id);
      }
      refreshSoon();
    });
  }
  source.addEventListener("run_progress", onProgress);
}

function tick() {
  // Relative times move on without a request.
  for (const node of document.querySelectorAll("[data-ago]")) node.textContent = ago(node.dataset.ago);
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-save").addEventListener("click", saveToken);
  $("token").addEventListener("keydown", (e) => { if (e.key === "Enter") saveToken(); });
  $("token-forget").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); showToken(); });
  $("older").addEventListener("click", loadOlder);
  $("filter-job").addEventListener("change", () => { state.runs = []; loadRuns(); });
  $("filter-status").addEventListener("change", () => { state.runs = []; loadRuns(); });
  $("detail-close").addEventListener("click", () => { $("detail").hidden = true; state.detail = null; drawRuns(); });
  $("pause-cancel").addEventListener("click", () => { $("pause-dialog").hidden = true; });
  $("pause-ok").addEventListener("click", confirmPause);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { $("pause-dialog").hidden = true; }
  });
  showToken();
  loadStatus();
  loadRuns();
  connect();
  setInterval(tick, 5000);
  // A safety net for what no event reports (heartbeats, next fires).
  setInterval(refreshSoon, 30000);
});
