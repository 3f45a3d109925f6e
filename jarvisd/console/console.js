/* jarvisd approvals console: plain DOM, no framework, no HTML parsing.
   Everything the agents wrote (actions, descriptions, parameters, reasons)
   goes into the page as text nodes only (createElement, textContent, append). */
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const TIMEOUT_MS = 15000;
  const PAGE = 50;
  const DECIDERS = new Set(["admin", "approver"]);
  const RISKS = new Set(["LOW", "MEDIUM", "HIGH", "CRITICAL"]);
  const STATUSES = new Set(["pending", "approved", "rejected", "expired", "cancelled"]);
  const rawPrefix = document.querySelector('meta[name="jarvisd-prefix"]')?.getAttribute("content") ?? "";
  const PREFIX = rawPrefix === "__JARVISD_PREFIX__" ? "jarvis:" : rawPrefix;

  const state = {
    token: null,
    user: null,
    route: { view: "pending", id: null },
    lastList: "pending",
    pending: new Map(), // id -> Approval, shown oldest first
    pendingCursor: null,
    pendingLoaded: false,
    pendingGen: 0,
    pendingInFlight: false, // a first page is being read
    reloadAfter: false, // read the first page again once that one is in
    history: { items: [], cursor: null, loaded: false, gen: 0 },
    detail: null, // the Approval on screen
    detailGen: 0,
    deciding: false,
    drafts: new Map(), // approval id -> reason typed so far
    openedFromList: false,
    ws: null,
    wsTimer: null,
    pingTimer: null,
    backoff: 1000,
    resuming: false, // the last subscribe carried "since"
    lastEventId: null,
    healthTimer: null,
    tickTimer: null,
  };
  let readyMarked = false;
  let hashNavigated = false; // a hash change happened since load: "back" stays in the console

  // ---------------------------------------------------------------- helpers

  // Control, format and bidirectional characters, with which an agent's text
  // could hide itself or reorder what a person reads, are shown as \uXXXX.
  // (Unicode classes: control, format — bidi marks and overrides, zero
  // widths, tag characters —, line and paragraph separators, private use,
  // unassigned; newlines and tabs stay.)
  const HIDDEN = /(?![\n\t])[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Co}\p{Cn}]/gu;
  function visible(text) {
    return String(text).replace(HIDDEN, (c) => {
      const code = c.codePointAt(0);
      return code > 0xffff ? `\\u{${code.toString(16)}}` : `\\u${code.toString(16).padStart(4, "0")}`;
    });
  }

  /** An element with a class and text (or children). */
  function el(tag, cls, ...content) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    for (const c of content) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : visible(c));
    }
    return node;
  }

  function show(node, visible) { node.hidden = !visible; }

  function say(node, text, kind) {
    node.textContent = visible(text || "");
    node.classList.toggle("is-error", kind === "error");
    node.classList.toggle("is-ok", kind === "ok");
    if (node.classList.contains("notice")) node.hidden = !text;
  }

  function when(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
  }

  /** "3 min" / "2 h" / "4 days" for a span of milliseconds. */
  function span(ms) {
    const s = Math.abs(ms) / 1000;
    if (s < 60) return "under a minute";
    if (s < 3600) return `${Math.round(s / 60)} min`;
    if (s < 172800) return `${Math.round(s / 3600)} h`;
    return `${Math.round(s / 86400)} days`;
  }

  function ago(iso) {
    const t = Date.parse(iso);
    if (Number.isNaN(t)) return "";
    const ms = Date.now() - t;
    return ms < 60000 ? "just now" : `${span(ms)} ago`;
  }

  function left(iso) {
    const t = Date.parse(iso);
    if (Number.isNaN(t)) return { text: "", soon: false };
    const ms = t - Date.now();
    if (ms <= 0) return { text: "expired", soon: true };
    return { text: `expires in ${span(ms)}`, soon: ms < 60000 };
  }

  /** A span whose text the ticker keeps current: kind "ago" or "left". */
  function relative(iso, kind) {
    const node = el("span", "rel");
    node.dataset.rel = kind;
    node.dataset.at = iso || "";
    paintRelative(node);
    return node;
  }

  function paintRelative(node) {
    if (node.dataset.rel === "ago") {
      node.textContent = ago(node.dataset.at);
      return;
    }
    const l = left(node.dataset.at);
    node.textContent = l.text;
    node.classList.toggle("soon", l.soon);
  }

  function tick() {
    for (const node of document.querySelectorAll("[data-rel]")) paintRelative(node);
  }

  const riskClass = (cat) => (RISKS.has(cat) ? cat.toLowerCase() : "unknown");

  function riskBadge(cat) {
    return el("span", `badge risk-${riskClass(cat)}`, cat || "UNKNOWN");
  }

  function statusBadge(status, id) {
    const s = STATUSES.has(status) ? status : "unknown";
    const node = el("span", `pill status-${s}`, status || "unknown");
    if (id) node.id = id;
    return node;
  }

  /** Text ending with a full stop, for joining with the next sentence. */
  function sentence(text) { return /[.!?]$/.test(text) ? text : `${text}.`; }

  function plural(n, one, many) { return `${n} ${n === 1 ? one : many}`; }

  function mayDecide() { return DECIDERS.has(state.user?.role); }

  // -------------------------------------------------------------------- api

  class ApiError extends Error {
    constructor(status, message, body = null, retryAfter = null) {
      super(message);
      this.status = status;
      this.body = body;
      this.retryAfter = retryAfter;
    }
  }

  function problemText(status, body) {
    const detail = body && typeof body === "object" ? body.detail || body.title : null;
    switch (status) {
      case 404: return detail ? `Not found: ${detail}` : "Not found.";
      case 503: return `The daemon is busy, try again.${detail ? ` (${detail})` : ""}`;
      case 429: return `${sentence(detail || "Too many requests")} Try again later.`;
      default: return detail || `The daemon answered HTTP ${status}.`;
    }
  }

  async function api(method, path, body, { auth = true } = {}) {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), TIMEOUT_MS);
    const headers = { Accept: "application/json, application/problem+json" };
    if (auth && state.token) headers.Authorization = `Bearer ${state.token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let res, text;
    try {
      res = await fetch(path, {
        method, headers, signal: ctrl.signal, cache: "no-store", credentials: "omit",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      text = await res.text();
    } catch (err) {
      throw new ApiError(0, err?.name === "AbortError"
        ? "The daemon did not answer within 15 s; try again."
        : "Cannot reach the daemon; check the connection and try again.");
    } finally {
      clearTimeout(timer);
    }
    let data = null;
    if (text) { try { data = JSON.parse(text); } catch { data = null; } }
    if (res.status === 401 && auth && state.token) {
      sessionEnded();
      throw new ApiError(401, "Your session ended; log in again.", data);
    }
    if (!res.ok) {
      throw new ApiError(res.status, problemText(res.status, data), data, res.headers.get("Retry-After"));
    }
    return data;
  }

  const approvalPath = (id) => `/approvals/${encodeURIComponent(id)}`;

  // ------------------------------------------------------------ auth, shell

  function loadSession() {
    try {
      state.token = sessionStorage.getItem("jarvisd.token");
      state.user = JSON.parse(sessionStorage.getItem("jarvisd.user") || "null");
    } catch {
      state.token = null;
      state.user = null;
    }
  }

  function clearSession() {
    try {
      sessionStorage.removeItem("jarvisd.token");
      sessionStorage.removeItem("jarvisd.user");
    } catch { /* storage unavailable: nothing kept */ }
    state.token = null;
    state.user = null;
  }

  function showLogin(message) {
    show($("app"), false);
    show($("login-view"), true);
    say($("login-error"), message || "");
    $("password").value = "";
    ($("username").value ? $("password") : $("username")).focus();
  }

  function stopApp() {
    disconnect();
    clearInterval(state.healthTimer);
    clearInterval(state.tickTimer);
    state.healthTimer = state.tickTimer = null;
    state.pending.clear();
    state.pendingCursor = null;
    state.pendingLoaded = false;
    state.pendingGen++;
    state.history = { items: [], cursor: null, loaded: false, gen: state.history.gen + 1 };
    state.detail = null;
    state.detailGen++;
    state.drafts.clear();
    state.lastEventId = null;
    state.pendingInFlight = state.reloadAfter = false;
    $("pending").replaceChildren();
    $("history-list").replaceChildren();
  }

  function sessionEnded() {
    if (!state.token) return;
    clearSession();
    stopApp();
    showLogin("Your session ended; log in again.");
  }

  async function onLogin(event) {
    event.preventDefault();
    const username = $("username").value.trim();
    const password = $("password").value;
    const err = $("login-error");
    if (!username || !password) {
      say(err, "Enter your username and password.", "error");
      return;
    }
    const button = $("login-submit");
    button.disabled = true;
    say(err, "");
    try {
      const data = await api("POST", "/auth/login", { username, password }, { auth: false });
      if (!data?.token) throw new ApiError(0, "The daemon's answer had no token.");
      state.token = data.token;
      state.user = data.user || { username, role: "user" };
      try {
        sessionStorage.setItem("jarvisd.token", state.token);
        sessionStorage.setItem("jarvisd.user", JSON.stringify(state.user));
      } catch { /* kept in memory only */ }
      $("password").value = "";
      startApp();
    } catch (e) {
      let text = e.message;
      if (e.status === 429) {
        const wait = Number(e.retryAfter);
        const inN = wait > 0 ? ` (in ${wait < 60 ? `${wait} s` : span(wait * 1000)})` : "";
        text = `${sentence(e.body?.detail || "Too many attempts")} Try again later${inN}.`;
      }
      say(err, text, "error");
      $("password").focus();
    } finally {
      button.disabled = false;
    }
  }

  async function onLogout() {
    const token = state.token;
    clearSession();
    stopApp();
    showLogin("You are logged out.");
    if (token) {
      fetch("/auth/logout", { method: "POST", headers: { Authorization: `Bearer ${token}` }, credentials: "omit" })
        .catch(() => {});
    }
  }

  function startApp() {
    show($("login-view"), false);
    show($("app"), true);
    const u = state.user || {};
    $("who").textContent = `${u.username ?? "?"} (${u.role ?? "?"})`;
    show($("role-notice"), !mayDecide());
    checkHealth();
    state.healthTimer = setInterval(checkHealth, 10000);
    state.tickTimer = setInterval(tick, 15000);
    connect();
    loadPending(true);
    route();
  }

  // ------------------------------------------------------------------ health

  async function checkHealth() {
    const badge = $("health");
    let data = null;
    try {
      const ctrl = new AbortController();
      const timer = setTimeout(() => ctrl.abort(), TIMEOUT_MS);
      try {
        const res = await fetch("/health/ready", { cache: "no-store", credentials: "omit", signal: ctrl.signal });
        data = await res.json();
      } finally {
        clearTimeout(timer);
      }
    } catch { data = null; }
    const status = data?.status;
    const label = { pass: "healthy", warn: "degraded", fail: "failing" }[status] || "unreachable";
    badge.textContent = label;
    badge.className = `pill health-${["pass", "warn"].includes(status) ? status : "fail"}`;
    const bad = [];
    for (const [name, list] of Object.entries(data?.checks || {})) {
      for (const c of Array.isArray(list) ? list : []) {
        if (c?.status !== "pass") bad.push({ name, ...c });
      }
    }
    const items = bad.map((c) => el("li", `check-${c.status}`,
      el("strong", null, c.name), c.componentId && c.componentId !== c.name ? ` (${c.componentId})` : "",
      `: ${c.status}`, c.output ? ` — ${c.output}` : ""));
    $("health-checks").replaceChildren(...items);
    const summary = !data ? "The daemon's health could not be read."
      : bad.length ? `${plural(bad.length, "check does", "checks do")} not pass:` : "All checks pass.";
    $("health-summary").textContent = summary;
    badge.title = `Daemon health: ${label}. ${summary}${bad.length ? ` ${bad.map((c) => c.name).join(", ")}` : ""}`;
  }

  // ------------------------------------------------------------------- rows

  function row(a, where) {
    const link = el("a", `approval-row risk-edge-${riskClass(a.riskCategory)}`);
    link.href = `#/approvals/${a.id}`;
    link.dataset.approvalId = String(a.id);
    const title = el("span", "row-title", el("span", "row-id", `#${a.id}`), " ", el("span", "row-action", a.action));
    if (a.escalatedAt) title.append(" ", el("span", "tag tag-escalated", "escalated"));
    if (where === "history") title.append(" ", statusBadge(a.status));
    const risk = el("span", "row-risk", riskBadge(a.riskCategory), " ", el("span", "score", `${a.riskScore ?? "?"}/100`));
    const who = el("span", "row-who", a.requester ?? `user #${a.requesterId}`, a.sender ? ` · ${a.sender}` : "");
    const times = el("span", "row-time");
    if (where === "history") {
      times.append(a.decidedAt ? relative(a.decidedAt, "ago") : relative(a.createdAt, "ago"),
        a.decider ? ` · by ${a.decider}` : "");
    } else {
      times.append(relative(a.createdAt, "ago"), " · ", relative(a.expiresAt, "left"));
    }
    link.append(title, risk, who, times);
    if (a.description) link.append(el("span", "row-desc", a.description));
    if ((a.approvalsRequired ?? 1) > 1) {
      const n = a.approvals?.length ?? 0;
      link.append(el("span", "row-quorum", `${n} of ${a.approvalsRequired} approvals`));
    }
    return el("li", null, link);
  }

  // ---------------------------------------------------------------- pending

  function sortedPending() {
    return [...state.pending.values()].sort((x, y) =>
      (Date.parse(x.createdAt) - Date.parse(y.createdAt)) || (x.id - y.id));
  }

  /** Rebuild a list's rows, keeping the keyboard focus on the same row (or a neighbour). */
  function replaceRows(list, rows) {
    const focused = list.contains(document.activeElement) ? document.activeElement.dataset.approvalId : null;
    const index = focused ? [...list.querySelectorAll(".approval-row")].indexOf(document.activeElement) : -1;
    list.replaceChildren(...rows);
    if (!focused) return;
    const all = list.querySelectorAll(".approval-row");
    const same = list.querySelector(`[data-approval-id="${CSS.escape(focused)}"]`);
    const target = same || all[Math.min(index, all.length - 1)];
    if (target) target.focus({ preventScroll: true });
    else list.closest("section")?.querySelector("h1")?.focus({ preventScroll: true });
  }

  function renderPending() {
    const list = sortedPending();
    const n = list.length;
    const rows = list.map((a) => row(a, "pending"));
    if (state.pendingLoaded && n === 0) rows.push(el("li", "empty", "Nothing waits for a decision."));
    replaceRows($("pending"), rows);
    const more = state.pendingCursor ? "+" : "";
    $("pending-count").textContent = state.pendingLoaded ? `${n}${more} pending` : "Loading…";
    $("nav-count").textContent = state.pendingLoaded && n ? `(${n}${more})` : "";
    show($("pending-more"), Boolean(state.pendingCursor));
    document.title = n ? `(${n}${more}) jarvisd approvals` : "jarvisd approvals";
  }

  async function loadPending(first) {
    const gen = ++state.pendingGen;
    const params = new URLSearchParams({ status: "pending", order: "createdAt", limit: String(PAGE) });
    if (!first && state.pendingCursor) params.set("cursor", state.pendingCursor);
    const button = $("pending-more");
    button.disabled = true;
    if (first) state.pendingInFlight = true;
    try {
      const data = await api("GET", `/approvals?${params}`);
      if (gen !== state.pendingGen) return;
      if (first) state.pendingInFlight = false;
      if (first) state.pending.clear();
      for (const a of data?.items || []) state.pending.set(a.id, a);
      state.pendingCursor = data?.nextCursor ?? null;
      state.pendingLoaded = true;
      say($("banner"), "");
      renderPending();
      if (!readyMarked) {
        readyMarked = true;
        // Marked once the list has been painted: the frame, then the task after it.
        requestAnimationFrame(() => setTimeout(() => {
          performance.mark("jarvisd:pending-ready");
          document.body.dataset.ready = "1";
        }, 0));
      }
      if (first && state.reloadAfter) {
        state.reloadAfter = false;
        loadPending(true);
      }
    } catch (e) {
      if (gen === state.pendingGen) state.pendingInFlight = false;
      if (e.status !== 401) banner(`Could not load the pending requests: ${e.message}`);
    } finally {
      button.disabled = false;
    }
  }

  /** A fresh copy of one request goes into the pending list (or leaves it). */
  function updatePending(a) {
    if (!a) return;
    if (a.status !== "pending") {
      if (state.pending.delete(a.id)) renderPending();
      return;
    }
    if (!state.pending.has(a.id) && state.pendingCursor) {
      // Beyond the loaded page: "Load more" brings it, in order.
      const list = sortedPending();
      const last = list[list.length - 1];
      if (last && Date.parse(a.createdAt) > Date.parse(last.createdAt)) return;
    }
    state.pending.set(a.id, a);
    renderPending();
  }

  function banner(text) { say($("banner"), text, "error"); }

  // ---------------------------------------------------------------- history

  function historyQuery() {
    const params = new URLSearchParams({ status: $("filter-status").value, order: "-createdAt", limit: String(PAGE) });
    if ($("filter-risk").value) params.set("riskCategory", $("filter-risk").value);
    const q = $("filter-q").value.trim();
    if (q) params.set("q", q);
    return params;
  }

  async function loadHistory(first) {
    const h = state.history;
    const gen = ++h.gen;
    const params = historyQuery();
    if (!first && h.cursor) params.set("cursor", h.cursor);
    $("history-more").disabled = true;
    if (first) $("history-count").textContent = "Loading…";
    try {
      const data = await api("GET", `/approvals?${params}`);
      if (gen !== h.gen) return;
      const items = data?.items || [];
      if (first) {
        h.items = items;
      } else {
        const seen = new Set(h.items.map((a) => a.id));
        h.items.push(...items.filter((a) => !seen.has(a.id)));
      }
      h.cursor = data?.nextCursor ?? null;
      h.loaded = true;
      renderHistory();
    } catch (e) {
      if (e.status !== 401) $("history-count").textContent = `Could not load the history: ${e.message}`;
    } finally {
      $("history-more").disabled = false;
    }
  }

  function renderHistory() {
    const h = state.history;
    const rows = h.items.map((a) => row(a, "history"));
    if (h.loaded && !rows.length) rows.push(el("li", "empty", "No decided request matches."));
    replaceRows($("history-list"), rows);
    $("history-count").textContent = `${h.items.length}${h.cursor ? "+" : ""} shown`;
    show($("history-more"), Boolean(h.cursor));
  }

  // ----------------------------------------------------------------- detail

  function field(dl, label, ...value) {
    dl.append(el("dt", null, label), el("dd", null, ...value));
  }

  async function openDetail(id) {
    const gen = ++state.detailGen;
    state.detail = null;
    say($("outcome"), "");
    say($("detail-notice"), "");
    $("reason").value = state.drafts.get(id) || "";
    $("reason").removeAttribute("aria-invalid");
    $("detail-title").textContent = `Request #${id}`;
    show($("detail-body"), false);
    show($("detail-loading"), true);
    try {
      const a = await api("GET", approvalPath(id));
      if (gen !== state.detailGen) return;
      renderDetail(a);
      loadDetailHistory(id, gen);
    } catch (e) {
      if (gen !== state.detailGen || e.status === 401) return;
      show($("detail-loading"), false);
      say($("detail-notice"), e.status === 404 ? `Request #${id} was not found.` : e.message, "error");
    }
  }

  /** Read the open request again; this read wins over any still in flight. */
  async function refreshDetail(notice) {
    const id = state.route.id;
    if (state.route.view !== "detail" || state.deciding) return;
    const gen = ++state.detailGen;
    try {
      const a = await api("GET", approvalPath(id));
      updatePending(a);
      if (gen !== state.detailGen) return;
      renderDetail(a);
      if (notice) say($("detail-notice"), notice(a));
      loadDetailHistory(a.id, gen);
    } catch (e) {
      if (gen === state.detailGen && !state.detail && e.status !== 401) {
        show($("detail-loading"), false);
        say($("detail-notice"), e.message, "error");
      }
    }
  }

  function renderDetail(a) {
    state.detail = a;
    show($("detail-loading"), false);
    show($("detail-body"), true);
    $("detail-title").textContent = visible(`Request #${a.id}: ${a.action}`);
    const dl = $("detail-fields");
    dl.replaceChildren();
    field(dl, "Status", statusBadge(a.status, "detail-status"));
    field(dl, "Action", el("code", "action", a.action));
    field(dl, "Description", el("div", "prewrap", a.description || "—"));
    field(dl, "Risk", riskBadge(a.riskCategory), ` score ${a.riskScore ?? "?"} of 100`,
      a.scoreRule ? el("span", "muted", ` — ${a.scoreRule}`) : "");
    field(dl, "Requester", a.requester ?? "—", el("span", "muted", ` (user id ${a.requesterId ?? "—"})`));
    field(dl, "Sender", a.sender ?? "—");
    field(dl, "Created by", a.createdBy ?? "—");
    field(dl, "Command", a.commandId ?? "none");
    field(dl, "Created", when(a.createdAt), " (", relative(a.createdAt, "ago"), ")");
    const exp = el("dd", null, when(a.expiresAt));
    if (a.status === "pending") exp.append(" (", relative(a.expiresAt, "left"), ")");
    dl.append(el("dt", null, "Expires"), exp);
    field(dl, "Escalated", a.escalatedAt ? when(a.escalatedAt) : "no");

    $("detail-parameters").textContent = visible(JSON.stringify(a.parameters ?? null, null, 2));
    $("detail-digest").textContent = a.parametersDigest ? `Parameters digest: ${a.parametersDigest}` : "";

    renderApprovals(a);

    const decided = a.status !== "pending";
    show($("detail-decision"), decided);
    const dd = $("detail-decision-fields");
    dd.replaceChildren();
    if (decided) {
      field(dd, "Outcome", statusBadge(a.status));
      field(dd, "Decided by", a.decider ?? (a.decidedBy != null ? `user #${a.decidedBy}` : "—"));
      if (a.decidedAt) field(dd, "When", when(a.decidedAt), " (", relative(a.decidedAt, "ago"), ")");
      else field(dd, "When", "—");
      field(dd, "Reason", el("div", "prewrap", a.reason || "—"));
    }

    const can = !decided && mayDecide();
    show($("decide"), can);
    show($("decide-readonly"), !decided && !mayDecide());
    const mine = (a.approvals || []).some((x) => x.userId != null && x.userId === state.user?.id);
    say($("decide-note"), mine ? "You already approved this request; it waits for others." : "");
    show($("decide-note"), mine);
    setDeciding(state.deciding);
  }

  function renderApprovals(a) {
    const box = $("detail-approvals");
    const got = a.approvals || [];
    const need = a.approvalsRequired ?? 1;
    const admins = a.adminsRequired ?? 0;
    const summary = `${got.length} of ${need} needed${admins > 0 ? `; at least ${plural(admins, "admin", "admins")}` : ""}.`;
    const parts = [el("p", null, summary)];
    if (got.length) {
      const tbody = el("tbody", null, ...got.map((x) => el("tr", null,
        el("td", null, x.by ?? "—"), el("td", null, x.admin ? "yes" : "no"),
        el("td", null, when(x.at)), el("td", "prewrap", x.reason || "—"))));
      const head = el("tr", null, ...["Who", "Admin", "When", "Reason"].map((t) => {
        const th = el("th", null, t);
        th.scope = "col";
        return th;
      }));
      parts.push(el("div", "table-wrap", el("table", null, el("thead", null, head), tbody)));
    } else {
      parts.push(el("p", "muted", "No approvals yet."));
    }
    box.replaceChildren(...parts);
  }

  async function loadDetailHistory(id, gen) {
    const tbody = $("detail-history").tBodies[0];
    try {
      const data = await api("GET", `${approvalPath(id)}/history`);
      if (gen !== state.detailGen) return;
      const items = data?.items || [];
      tbody.replaceChildren(...items.map((h) => el("tr", null,
        el("td", null, when(h.at)), el("td", null, h.subject ?? ""),
        el("td", null, h.from ? `${h.from} → ${h.to}` : `→ ${h.to}`),
        el("td", null, h.by ?? "—"), el("td", "prewrap", h.reason ?? ""))));
      if (!items.length) tbody.replaceChildren(el("tr", null, el("td", "muted", "No history.")));
    } catch (e) {
      if (gen !== state.detailGen || e.status === 401) return;
      tbody.replaceChildren(el("tr", null, el("td", "muted", `Could not load the history: ${e.message}`)));
    }
  }

  function setDeciding(busy) {
    state.deciding = busy;
    $("approve").disabled = busy;
    $("reject").disabled = busy;
    $("reason").readOnly = busy;
    $("decide").setAttribute("aria-busy", busy ? "true" : "false");
  }

  async function onDecide(event) {
    event.preventDefault();
    const a = state.detail;
    if (!a || state.deciding) return;
    const verb = event.submitter?.value === "reject" ? "reject" : "approve";
    const reason = $("reason").value.trim();
    const out = $("outcome");
    if (verb === "reject" && !reason) {
      $("reason").setAttribute("aria-invalid", "true");
      say(out, "A rejection needs a reason: write why in the Reason box.", "error");
      $("reason").focus();
      return;
    }
    $("reason").removeAttribute("aria-invalid");
    setDeciding(true);
    say(out, verb === "approve" ? "Sending your approval…" : "Sending your rejection…");
    const gen = state.detailGen;
    try {
      const b = await api("PUT", `${approvalPath(a.id)}/${verb}`, reason ? { reason } : {});
      state.drafts.delete(a.id);
      updatePending(b);
      if (gen !== state.detailGen) return;
      $("reason").value = "";
      if (b.status === "pending") {
        say(out, `Your approval is recorded: ${b.approvals?.length ?? 0} of ${b.approvalsRequired ?? "?"}.`, "ok");
      } else {
        say(out, `Done: request #${b.id} is ${b.status}.`, "ok");
      }
      renderDetail(b);
      loadDetailHistory(b.id, gen);
    } catch (e) {
      if (gen !== state.detailGen || e.status === 401) return;
      if (e.status === 409) {
        const cur = e.body?.current;
        const detail = String(e.body?.detail || e.message).replace(/\.$/, "");
        const by = cur?.decider ? ` by ${cur.decider}` : "";
        if (cur?.status === "pending") {
          // Not decided: this person's approval is counted already.
          say(out, `${detail}.`, "error");
        } else {
          say(out, `Already decided: ${detail}. Current status: ${cur?.status ?? "unknown"}${by}.`, "error");
        }
        if (cur) {
          updatePending(cur);
          renderDetail(cur);
          loadDetailHistory(cur.id, gen);
        }
      } else {
        say(out, e.message, "error");
      }
    } finally {
      setDeciding(false);
      // The form is gone once decided: keep the keyboard focus on the outcome.
      const lost = !document.activeElement || document.activeElement === document.body;
      if ($("decide").hidden && (lost || $("decide").contains(document.activeElement))) out.focus();
    }
  }

  // ------------------------------------------------------------- websocket

  function setLive(text, cls) {
    const node = $("live");
    node.textContent = text;
    node.className = `pill ${cls}`;
    node.title = cls === "live-on" ? "Live updates are on" : "Live updates are off; the page still works, decisions go over HTTP";
  }

  function connect() {
    clearTimeout(state.wsTimer);
    state.wsTimer = null;
    if (!state.token || state.ws) return;
    const token = state.token;
    let ws;
    try {
      ws = new WebSocket(`${location.protocol === "https:" ? "wss://" : "ws://"}${location.host}/ws`);
    } catch {
      scheduleReconnect();
      return;
    }
    state.ws = ws;
    if ($("live").textContent !== "reconnecting…") setLive("connecting…", "live-off");
    ws.addEventListener("open", () => {
      ws.send(JSON.stringify({ op: "auth", token }));
      const sub = { op: "subscribe", channels: [`${PREFIX}approvals`] };
      if (state.lastEventId !== null) sub.since = state.lastEventId;
      state.resuming = state.lastEventId !== null;
      ws.send(JSON.stringify(sub));
      clearInterval(state.pingTimer);
      state.pingTimer = setInterval(() => {
        if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ op: "ping" }));
      }, 25000);
    });
    ws.addEventListener("message", (ev) => {
      if (state.ws !== ws) return;
      let frame;
      try { frame = JSON.parse(ev.data); } catch { return; }
      onFrame(frame);
    });
    ws.addEventListener("close", (ev) => {
      if (state.ws !== ws) return;
      state.ws = null;
      clearInterval(state.pingTimer);
      if (!state.token) return;
      // 1008: the socket refused the credential; an API call tells whether the session ended.
      if (ev.code === 1008) api("GET", "/approvals?status=pending&limit=1").catch(() => {});
      scheduleReconnect();
    });
  }

  function scheduleReconnect() {
    if (!state.token) return;
    setLive("reconnecting…", "live-off");
    const delay = state.backoff;
    state.backoff = Math.min(state.backoff * 2, 15000);
    clearTimeout(state.wsTimer);
    state.wsTimer = setTimeout(connect, delay);
  }

  function disconnect() {
    clearTimeout(state.wsTimer);
    clearInterval(state.pingTimer);
    state.wsTimer = state.pingTimer = null;
    const ws = state.ws;
    state.ws = null;
    state.backoff = 1000;
    if (ws) { try { ws.close(1000, "logged out"); } catch { /* closing anyway */ } }
    setLive("offline", "live-off");
  }

  function onFrame(frame) {
    switch (frame?.type) {
      case "subscribed": {
        state.backoff = 1000;
        setLive("live", "live-on");
        // A subscription without "since" (no event seen yet, on this
        // connection or an earlier one) replays nothing: what happened
        // before it is read again from the API. With "since", the event log
        // replays what the page missed.
        if (!state.resuming) {
          if (state.pendingInFlight) state.reloadAfter = true;
          else if (state.pendingLoaded) loadPending(true);
          if (state.route.view === "detail") refreshDetail();
        }
        break;
      }
      case "subscription.gap":
        loadPending(true);
        if (state.route.view === "detail") refreshDetail();
        break;
      case "error":
        if (frame.op === "subscribe") {
          setLive("not live", "live-off");
          banner(`Live updates are off: ${frame.error || "refused"}. Reload the page to try again.`);
        }
        break;
      case "message":
        onEvent(typeof frame.data === "string" ? safeParse(frame.data) : frame.data);
        break;
      default: // authenticated, pong, unsubscribed
    }
  }

  function safeParse(text) { try { return JSON.parse(text); } catch { return null; } }

  function onEvent(ev) {
    if (!ev || typeof ev !== "object") return;
    const n = Number(ev.id);
    if (Number.isSafeInteger(n) && (state.lastEventId === null || n > state.lastEventId)) state.lastEventId = n;
    const id = ev.data?.approvalId;
    if (id === undefined || id === null) return;
    const open = state.route.view === "detail" && state.route.id === id;
    switch (ev.type) {
      case "approval.requested":
      case "approval.vote":
      case "approval.escalated":
      case "approval.warning": {
        if (open) {
          refreshDetail(); // updates the row too
        } else if (ev.type === "approval.requested" || state.pending.has(id)) {
          api("GET", approvalPath(id)).then(updatePending, () => { /* gone, or not for this user */ });
        }
        break;
      }
      case "approval.decided":
      case "approval.expired": {
        if (state.pending.delete(id)) renderPending();
        if (open && (state.detail?.status ?? "pending") === "pending") {
          const expired = ev.type === "approval.expired";
          refreshDetail((a) => expired || a.status === "expired"
            ? "This request expired."
            : `This request was ${a.status} by ${a.decider ?? ev.data?.decider ?? "someone"}.`);
        }
        break;
      }
      default:
    }
  }

  // ------------------------------------------------------------------ router

  function parseHash() {
    const h = location.hash.replace(/^#/, "");
    const m = /^\/?approvals\/(\d+)\/?$/.exec(h);
    if (m) return { view: "detail", id: Number(m[1]) };
    if (/^\/?history\/?$/.test(h)) return { view: "history", id: null };
    return { view: "pending", id: null };
  }

  function route() {
    if (!state.token) return;
    const prev = state.route;
    const next = parseHash();
    state.route = next;
    show($("pending-view"), next.view === "pending");
    show($("history"), next.view === "history");
    show($("detail"), next.view === "detail");
    $("nav-pending").toggleAttribute("aria-current", false);
    $("nav-history").toggleAttribute("aria-current", false);
    if (next.view !== "detail") {
      $(`nav-${next.view}`).setAttribute("aria-current", "page");
      state.lastList = next.view;
    }
    if (next.view === "detail") {
      state.openedFromList = prev.view !== "detail" && hashNavigated;
      $("detail-back").href = `#/${state.lastList}`;
      $("detail-back").textContent = `← Back to ${state.lastList === "history" ? "the history" : "pending requests"}`;
      if (prev.view !== "detail" || prev.id !== next.id || !state.detail) openDetail(next.id);
      $("detail-title").focus({ preventScroll: false });
      window.scrollTo(0, 0);
      return;
    }
    state.detailGen++; // a detail still loading is not shown any more
    state.detail = null;
    if (next.view === "history" && !state.history.loaded) loadHistory(true);
    if (prev.view === "detail" && prev.id !== null) {
      const back = document.querySelector(`#${next.view === "history" ? "history-list" : "pending"} [data-approval-id="${prev.id}"]`);
      (back || $(`${next.view}-title`)).focus();
    }
    tick();
  }

  function closeDetail() {
    if (state.openedFromList) history.back();
    else location.hash = `#/${state.lastList}`;
  }

  // ------------------------------------------------------------------- wiring

  function init() {
    $("login").addEventListener("submit", onLogin);
    $("logout").addEventListener("click", onLogout);
    $("pending-more").addEventListener("click", () => loadPending(false));
    $("history-more").addEventListener("click", () => loadHistory(false));
    $("history-filters").addEventListener("submit", (e) => { e.preventDefault(); loadHistory(true); });
    $("decide").addEventListener("submit", onDecide);
    $("reason").addEventListener("input", () => {
      $("reason").removeAttribute("aria-invalid");
      if (state.detail) state.drafts.set(state.detail.id, $("reason").value);
    });
    $("detail-back").addEventListener("click", (e) => {
      if (state.openedFromList) { e.preventDefault(); history.back(); }
    });
    window.addEventListener("hashchange", () => {
      hashNavigated = true;
      route();
    });
    document.addEventListener("keydown", (e) => {
      if (e.key !== "Escape" || e.isComposing || e.defaultPrevented) return;
      const box = $("health-box");
      if (box.open) { box.open = false; $("health").focus(); return; }
      if (state.token && state.route.view === "detail") { e.preventDefault(); closeDetail(); }
    });
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") tick();
    });

    loadSession();
    if (state.token) startApp();
    else showLogin("");
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
