// botline admin page: plain JavaScript, no build step, no CDN.
"use strict";

const API = "/admin/api";
const view = document.getElementById("view");
const TOKEN = "botline-admin-token";

const token = () => sessionStorage.getItem(TOKEN);

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(method, path, body) {
  const res = await fetch(API + path, {
    method,
    headers: { Authorization: `Bearer ${token()}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = res.status === 204 ? null : await res.json();
  if (res.status === 401 && path !== "/bots?check") signOut();
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

function mount(templateId) {
  view.replaceChildren(document.getElementById(templateId).content.cloneNode(true));
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

const when = (ms) =>
  ms ? new Date(ms).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" }) : "—";
const number = (n) => Number(n || 0).toLocaleString();

function showError(node, err) {
  node.textContent = err.message;
  node.hidden = false;
}

// --- sign in -----------------------------------------------------------------

function signOut() {
  sessionStorage.removeItem(TOKEN);
  document.getElementById("nav").hidden = true;
  renderSignIn();
}

function renderSignIn() {
  mount("tpl-sign-in");
  document.getElementById("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN, new FormData(event.target).get("token"));
    try {
      await api("GET", "/bots?check");
      route();
    } catch (err) {
      sessionStorage.removeItem(TOKEN);
      showError(document.getElementById("sign-in-error"), err);
    }
  });
}

// --- workers and the endpoints they serve ------------------------------------------

// The endpoints live workers serve, or null when the fleet cannot be read (no warning then).
async function liveEndpoints() {
  let workers;
  try {
    workers = await api("GET", "/workers");
  } catch (err) {
    if (err.status === 401) throw err;
    return null;
  }
  const served = new Set(workers.flatMap((w) => w.endpoints));
  const options = document.getElementById("endpoint-options");
  options.replaceChildren(...[...served].sort().map((name) => el("option", { value: name })));
  return served;
}

// Warn (not refuse: a worker may be about to start) when no live worker serves the endpoint.
function watchEndpoint(input, warning, served) {
  if (served === null) return;
  const check = () => {
    const name = input.value.trim();
    warning.hidden = !name || served.has(name);
    warning.textContent = served.size === 0
      ? `No live worker right now: requests to this bot wait in the queue until one starts.`
      : `No live worker serves the endpoint "${name}": requests to this bot will fail with `
        + `unknown_endpoint. Live endpoints: ${[...served].sort().join(", ")}.`;
  };
  input.addEventListener("input", check);
  check();
}

async function renderWorkers() {
  mount("tpl-workers");
  const rows = document.getElementById("worker-rows");
  const fill = async () => {
    const workers = await api("GET", "/workers");
    rows.replaceChildren(...workers.map((w) => {
      const row = el("tr", {},
        el("td", { className: "mono", textContent: w.worker_id }),
        el("td", { textContent: w.host || "—" }),
        el("td", { textContent: w.version }),
        el("td", { textContent: w.endpoints.join(", ") }),
        el("td", { className: "num", textContent: number(w.jobs_in_flight) }),
        el("td", { className: "num", textContent: number(w.capacity) }),
        el("td", { textContent: when(w.started_at) }),
        el("td", { textContent: when(w.seen_at) }));
      row.dataset.workerId = w.worker_id;
      return row;
    }));
    document.getElementById("no-workers").hidden = workers.length > 0;
    const endpoints = await api("GET", "/endpoints");
    const seconds = (ms) => (ms > 0 ? `${Math.ceil(ms / 1000)} s` : "—");
    document.getElementById("endpoint-rows").replaceChildren(...endpoints.map((e) => {
      const row = el("tr", {},
        el("td", { className: "mono", textContent: e.name }),
        el("td", { className: `state state-${e.state}`, textContent: e.state.replace("_", " ") }),
        el("td", { className: "num", textContent: number(e.failures) }),
        el("td", { className: "num", textContent: seconds(e.cooldown_ms) }),
        el("td", { className: "num", textContent: seconds(e.paused_ms) }),
        el("td", { className: "num", textContent: number(e.in_flight) }),
        el("td", { className: "num", textContent: number(e.recent_calls) }));
      row.dataset.endpoint = e.name;
      return row;
    }));
    document.getElementById("no-endpoints").hidden = endpoints.length > 0;
  };
  document.getElementById("refresh-workers").addEventListener("click", fill);
  await fill();
}

// --- bots ----------------------------------------------------------------------

async function renderBots() {
  mount("tpl-bots");
  // The buttons work as soon as they are on the page; the lists fill in behind them.
  const dialog = document.getElementById("bot-dialog");
  document.getElementById("new-bot").addEventListener("click", () => dialog.showModal());
  document.getElementById("bot-form").addEventListener("submit", async (event) => {
    if (event.submitter && event.submitter.value !== "create") return;
    event.preventDefault();
    const form = new FormData(event.target);
    try {
      const bot = await api("POST", "/bots", Object.fromEntries(form.entries()));
      dialog.close();
      location.hash = `#/bots/${bot.id}`;
    } catch (err) {
      showError(document.getElementById("bot-error"), err);
    }
  });
  const bots = await api("GET", "/bots");
  const rows = document.getElementById("bot-rows");
  for (const bot of bots) {
    rows.append(el("tr", {},
      el("td", {}, el("a", { href: `#/bots/${bot.id}`, textContent: bot.name })),
      el("td", { className: "mono", textContent: bot.id }),
      el("td", { textContent: bot.endpoint }),
      el("td", { textContent: bot.model })));
  }
  document.getElementById("no-bots").hidden = bots.length > 0;
  const served = await liveEndpoints();
  watchEndpoint(dialog.querySelector("[name=endpoint]"),
    document.getElementById("new-endpoint-warning"), served);
}

// --- one bot: settings and API keys ----------------------------------------------

const SETTINGS = ["name", "endpoint", "model", "system_prompt", "temperature", "top_p",
  "max_reply_tokens", "max_history_messages"];
const NUMBERS = new Set(["temperature", "top_p", "max_reply_tokens", "max_history_messages"]);
const LIMITS = ["rpm", "tpm", "concurrency"];

async function renderBot(botId) {
  mount("tpl-bot");
  const bot = await api("GET", `/bots/${botId}`);
  document.getElementById("bot-title").textContent = bot.name;
  document.getElementById("bot-id").textContent = bot.id;
  document.getElementById("confirm-bot").textContent = bot.name;

  const form = document.getElementById("settings-form");
  for (const name of SETTINGS) form.elements[name].value = bot[name];
  for (const name of LIMITS) form.elements[`limit_${name}`].value = bot.limits[name] ?? "";
  // Every control works as soon as the bot is on the page; the lists fill in behind them.
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const patch = { limits: {} };
    for (const name of SETTINGS) {
      const value = form.elements[name].value;
      patch[name] = NUMBERS.has(name) ? Number(value) : value;
    }
    for (const name of LIMITS) {
      const value = form.elements[`limit_${name}`].value;
      patch.limits[name] = value === "" ? null : Number(value);
    }
    const saved = document.getElementById("settings-saved");
    const error = document.getElementById("settings-error");
    error.hidden = saved.hidden = true;
    try {
      const updated = await api("PATCH", `/bots/${botId}`, patch);
      document.getElementById("bot-title").textContent = updated.name;
      saved.hidden = false;
    } catch (err) {
      showError(error, err);
    }
  });

  const confirm = document.getElementById("confirm-dialog");
  const shown = document.getElementById("key-dialog");
  document.getElementById("add-key").addEventListener("click", () => {
    confirm.querySelector("form").reset();
    confirm.showModal();
  });
  confirm.addEventListener("close", async () => {
    if (confirm.returnValue !== "confirm") return;
    const fields = new FormData(confirm.querySelector("form"));
    const expires = fields.get("expires");
    const created = await api("POST", `/bots/${botId}/keys`, {
      name: fields.get("name") || "",
      expires_at: expires ? Date.parse(`${expires}T23:59:59`) : null,
    });
    document.getElementById("new-key").textContent = created.key;
    shown.showModal();
    await renderKeys(botId); // the list shows the new key at once
  });
  document.getElementById("copy-key").addEventListener("click", async (event) => {
    await navigator.clipboard.writeText(document.getElementById("new-key").textContent);
    event.target.textContent = "Copied";
  });
  shown.addEventListener("close", () => {
    document.getElementById("new-key").textContent = ""; // not kept on the page
    document.getElementById("copy-key").textContent = "Copy";
  });
  const [served] = await Promise.all([liveEndpoints(), renderKeys(botId)]);
  watchEndpoint(form.elements.endpoint, document.getElementById("endpoint-warning"), served);
}

async function renderKeys(botId) {
  const [keys, usage] = await Promise.all([
    api("GET", `/bots/${botId}/keys`),
    api("GET", `/bots/${botId}/usage`),
  ]);
  document.getElementById("bot-usage").textContent =
    `All keys together: ${number(usage.requests)} request(s), ${number(usage.total_tokens)} tokens.`;
  const rows = document.getElementById("key-rows");
  rows.replaceChildren();
  for (const key of keys) {
    const actions = el("td", { className: "row-actions" });
    const act = (label, method, path, className = "") => {
      const button = el("button", { type: "button", textContent: label, className });
      button.dataset.action = label.toLowerCase();
      button.addEventListener("click", async () => {
        if (label === "Revoke" && !window.confirm(`Revoke ${key.prefix}…? Callers using it are refused at once.`)) return;
        await api(method, path);
        await renderKeys(botId);
      });
      actions.append(button);
    };
    if (key.disabled) act("Enable", "POST", `/keys/${key.key_id}/enable`);
    else act("Disable", "POST", `/keys/${key.key_id}/disable`);
    act("Revoke", "DELETE", `/keys/${key.key_id}`, "danger");
    const row = el("tr", {},
      el("td", { textContent: key.name || "—" }),
      el("td", { className: "mono", textContent: `${key.prefix}…` }),
      el("td", { textContent: when(key.created_at) }),
      el("td", { textContent: when(key.last_used_at) }),
      el("td", { textContent: key.expires_at ? when(key.expires_at) : "never" }),
      el("td", {}, el("span", { className: `badge ${key.status}`, textContent: key.status })),
      el("td", { className: "num", textContent: number(key.usage.requests) }),
      el("td", { className: "num", textContent: number(key.usage.total_tokens) }),
      actions);
    row.dataset.keyId = key.key_id;
    rows.append(row);
  }
  document.getElementById("no-keys").hidden = keys.length > 0;
}

// --- routing -------------------------------------------------------------------

async function route() {
  if (!token()) return renderSignIn();
  document.getElementById("nav").hidden = false;
  const match = location.hash.match(/^#\/bots\/([\w-]+)/);
  try {
    if (location.hash === "#/workers") await renderWorkers();
    else await (match ? renderBot(match[1]) : renderBots());
  } catch (err) {
    if (err.status !== 401) view.replaceChildren(el("p", { className: "error", textContent: err.message }));
  }
}

document.getElementById("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", route);
route();
