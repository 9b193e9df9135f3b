// fluxd's status page (served by flux/metrics/statuspage.py; see its theory of operation).
//
// Every two seconds the page reads /status (or /status?scope=cluster).  It turns either JSON
// shape (the full one of README "The status page", or the older one with only `balancer` and
// `agent`) into one model, then updates the DOM in place: one <tbody> per service keyed by host
// and name, its cells' text set only when it changed, instance rows built only for expanded
// services.  Any field may be missing or null and shows as "–".
//
// Charts: only the rows a person can see are charted, the ones on screen (and not hidden by the
// filter) and the expanded ones, at most CHART_UP_TO.  After each render, and soon after a
// scroll or a change of the filter, the page asks /status/history for those services only
// (&service=NAME, repeated): a service charted already with ?since= the last sample it holds,
// one newly charted without it (its whole 15 minutes).  A service that stops being charted
// drops its samples.  So at 1,000 services a refresh costs fluxd the history of a few dozen,
// not of all of them.
//
// Safety: every string from the JSON goes into the DOM through textContent or an attribute
// set with setAttribute on a non-executable attribute; nothing is ever parsed as markup.
"use strict";

const REFRESH_MS = 2000;
const FETCH_TIMEOUT_MS = 5000;
const STALE_MS = 3 * REFRESH_MS + 500;
const EXPAND_UP_TO = 20; // services: with more, rows start collapsed
const CHART_UP_TO = 50; // services charted at once (those on screen, then expanded ones)
const ON_SCREEN_MARGIN = 200; // px above and below the window that count as on screen
const RECHART_MS = 300; // after a scroll or a filter change, chart the rows then shown
const DASH = "–";
const SVG = "http://www.w3.org/2000/svg";
const CLASSES = ["2xx", "3xx", "4xx", "5xx"];
const HISTORY_SAMPLES = 180; // when the history does not say its capacity
const SPARK_W = 120;
const SPARK_H = 22;

const ui = {};
const state = {
  scope: "host",
  filter: "",
  expanded: new Map(), // row key -> the user's choice
  rows: new Map(), // row key -> ServiceRow
  order: [], // the ServiceRows in table order
  cards: new Map(), // host key -> host card
  history: new Map(), // host key -> {capacity, series: name -> {last, samples, version}}
  charted: new Set(), // row keys charted now
  model: null, // the last model rendered
  rechartTimer: null,
  lastOk: 0,
  asOf: null,
  error: null,
  timer: null,
  generation: 0,
};

// -- small helpers ------------------------------------------------------------------------

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function setAttr(node, name, value) {
  if (node.getAttribute(name) !== value) node.setAttribute(name, value);
}

function setClass(node, cls) {
  if (node.className !== cls) node.className = cls;
}

function isObj(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function obj(value) {
  return isObj(value) ? value : {};
}

function arr(value) {
  return Array.isArray(value) ? value : [];
}

function isNum(value) {
  return typeof value === "number" && Number.isFinite(value);
}

function text(value) {
  if (typeof value === "string" && value !== "") return value;
  if (isNum(value)) return String(value);
  return DASH;
}

function num(value) {
  if (!isNum(value)) return DASH;
  const abs = Math.abs(value);
  if (abs === 0) return "0";
  if (abs >= 100) return value.toFixed(0);
  if (abs >= 10) return value.toFixed(1);
  if (abs >= 0.01) return value.toFixed(2);
  return value.toPrecision(1);
}

function bytes(value) {
  if (!isNum(value)) return DASH;
  const units = ["B", "kB", "MB", "GB", "TB"];
  let scaled = value;
  let unit = 0;
  while (Math.abs(scaled) >= 1000 && unit < units.length - 1) {
    scaled /= 1000;
    unit += 1;
  }
  return `${num(scaled)} ${units[unit]}`;
}

function latency(seconds) {
  if (!isNum(seconds)) return DASH;
  if (seconds < 0.001) return `${num(seconds * 1e6)} µs`;
  if (seconds < 1) return `${num(seconds * 1000)} ms`;
  return `${num(seconds)} s`;
}

function duration(seconds) {
  if (!isNum(seconds)) return DASH;
  let left = Math.max(0, Math.floor(seconds));
  const parts = [];
  for (const [size, unit] of [[86400, "d"], [3600, "h"], [60, "m"]]) {
    if (left >= size || parts.length) {
      parts.push(`${Math.floor(left / size)}${unit}`);
      left %= size;
    }
  }
  parts.push(`${left}s`);
  return parts.slice(0, 2).join(" ");
}

function clock(unixSeconds) {
  if (!isNum(unixSeconds)) return DASH;
  const date = new Date(unixSeconds * 1000);
  return [date.getHours(), date.getMinutes(), date.getSeconds()]
    .map((part) => String(part).padStart(2, "0"))
    .join(":");
}

function ago(now, then) {
  if (!isNum(now) || !isNum(then)) return null;
  return `${duration(now - then)} ago`;
}

function join(parts) {
  const shown = parts.filter((part) => part !== null && part !== undefined && part !== "");
  return shown.length ? shown.join(" · ") : DASH;
}

function token(value) {
  return String(value).toLowerCase().replace(/[^a-z0-9]+/g, "-");
}

// -- the model: either JSON shape becomes {cluster, now, hosts[{key, ..., services}]} --------

function normInstance(raw, fallbackHost) {
  const item = obj(raw);
  return {
    name: text(item.name),
    host: typeof item.host === "string" ? item.host : fallbackHost,
    address: item.address,
    state: typeof item.state === "string" ? item.state : null,
    reason: item.reason,
    retry_at: item.retry_at,
    rule: item.rule,
    container_id: item.container_id,
    image: item.image,
    active: item.active,
    failures: item.failures,
    req_rate: item.req_rate,
    p99: item.p99,
  };
}

function normPublished(raw) {
  const list = Array.isArray(raw) ? raw : isObj(raw) ? [raw] : [];
  return list.map((entry) => {
    const item = obj(entry);
    return {
      port: item.port,
      hostnames: arr(item.hostnames).filter((name) => typeof name === "string"),
      state: item.state,
      reason: item.reason ?? item.error ?? item.conflict ?? null,
    };
  });
}

function countStates(instances) {
  const counts = {};
  for (const instance of instances) {
    const key = instance.state ?? "unknown";
    counts[key] = (counts[key] ?? 0) + 1;
  }
  return counts;
}

function normService(raw, hostIp) {
  const item = obj(raw);
  const instances = arr(item.instances).map((one) => normInstance(one, null));
  const figures = obj(item.figures);
  return {
    name: text(item.name),
    address: item.address,
    protocol: item.protocol,
    published: normPublished(item.published),
    state: item.state,
    reason: item.reason,
    byState: isObj(item.instances_by_state) ? item.instances_by_state : countStates(instances),
    connections_open: item.connections_open,
    now: obj(figures.now),
    m5: obj(figures["5m"]),
    instances,
    host: hostIp,
  };
}

// The shape fluxd served before the page (balancer.services and agent.instances): the pool's
// view (ready, failures, backoff, active) merged with this host's agent (lifecycle state).
function legacyServices(doc, hostIp, now) {
  const balancer = obj(doc.balancer);
  const agentByService = new Map();
  for (const raw of arr(obj(doc.agent).instances)) {
    const item = obj(raw);
    if (typeof item.service !== "string") continue;
    if (!agentByService.has(item.service)) agentByService.set(item.service, new Map());
    agentByService.get(item.service).set(text(item.instance), item);
  }
  const names = new Set([...Object.keys(obj(balancer.services)), ...agentByService.keys()]);
  const services = [];
  for (const name of [...names].sort()) {
    const entry = obj(obj(balancer.services)[name]);
    const agent = agentByService.get(name) ?? new Map();
    const pool = new Map(arr(entry.instances).map((raw) => [text(obj(raw).name), obj(raw)]));
    const instances = [];
    for (const instanceName of [...new Set([...pool.keys(), ...agent.keys()])].sort()) {
      const pooled = pool.get(instanceName);
      const mine = agent.get(instanceName);
      let instanceState = mine ? mine.state : null;
      if (pooled && (!mine || mine.state === "live")) {
        instanceState = pooled.ready === false ? "backoff" : "live";
      }
      const retryIn = pooled ? pooled.retry_in : null;
      instances.push(normInstance({
        name: instanceName,
        host: mine ? hostIp : null,
        address: (mine && mine.address) ?? (pooled && pooled.address),
        state: instanceState,
        retry_at: isNum(retryIn) && isNum(now) ? now + retryIn : null,
        rule: mine ? mine.rule : null,
        active: pooled ? pooled.active : null,
        failures: pooled ? pooled.failures : null,
      }, null));
    }
    const active = instances.map((one) => one.active).filter(isNum);
    services.push({
      name,
      address: entry.address,
      protocol: entry.protocol,
      published: normPublished(entry.published),
      state: entry.state ?? (instances.length ? "instances only" : null),
      reason: entry.conflict ?? null,
      byState: countStates(instances),
      connections_open: active.length ? active.reduce((a, b) => a + b, 0) : null,
      now: {},
      m5: {},
      instances,
      host: hostIp,
    });
  }
  return services;
}

function hostModel(rawDoc, fallbackHost, endpoint) {
  const doc = obj(rawDoc);
  const fluxd = obj(doc.fluxd);
  const hostIp = typeof fluxd.host_ip === "string" ? fluxd.host_ip : text(doc.host ?? fallbackHost);
  const now = isNum(fluxd.now) ? fluxd.now : Date.now() / 1000;
  const docker = obj(fluxd.docker);
  const agent = obj(doc.agent);
  const full = Array.isArray(doc.services);
  return {
    key: hostIp,
    reachable: true,
    endpoint,
    now,
    version: fluxd.version ?? doc.version,
    uptime: fluxd.uptime,
    etcd: obj(fluxd.etcd),
    docker: {
      connected: docker.connected ?? agent.docker_connected,
      last_reconcile: docker.last_reconcile,
    },
    engine: obj(fluxd.engine),
    healthy: doc.healthy,
    problems: arr(doc.problems).filter((line) => typeof line === "string"),
    publishIp: obj(doc.balancer).publish_ip,
    hasHistory: full,
    services: full
      ? doc.services.map((raw) => normService(raw, hostIp))
      : legacyServices(doc, hostIp, now),
  };
}

function toModel(rawDoc) {
  const doc = obj(rawDoc);
  if (!Array.isArray(doc.hosts)) {
    const host = hostModel(doc, null, null);
    return { cluster: false, now: host.now, hosts: [host] };
  }
  const hosts = doc.hosts.map((raw) => {
    const item = obj(raw);
    if (item.reachable === false || !isObj(item.status)) {
      return {
        key: text(item.host),
        reachable: false,
        endpoint: item.endpoint,
        error: item.error,
        services: [],
      };
    }
    return hostModel(item.status, item.host, item.endpoint);
  });
  return { cluster: true, now: isNum(doc.now) ? doc.now : Date.now() / 1000, hosts };
}

// -- the host cards ------------------------------------------------------------------------

const CARD_FIELDS = [
  ["version", (h) => text(h.version)],
  ["uptime", (h) => duration(h.uptime)],
  ["host IP", (h) => text(h.key)],
  ["etcd", (h) => join([
    h.etcd.reachable === true ? "reachable" : h.etcd.reachable === false ? "unreachable" : null,
    typeof h.etcd.endpoint === "string" ? h.etcd.endpoint : null,
    isNum(h.etcd.lease_age) ? `lease ${duration(h.etcd.lease_age)} old` : null,
  ])],
  ["Docker", (h) => join([
    h.docker.connected === true ? "events connected"
      : h.docker.connected === false ? "events down" : null,
    isNum(h.docker.last_reconcile) ? `reconciled ${ago(h.now, h.docker.last_reconcile)}` : null,
  ])],
  ["engine threads", (h) => text(h.engine.threads)],
  ["open connections", (h) => text(h.engine.open_connections)],
  ["descriptors", (h) => isNum(h.engine.fds_used)
    ? `${h.engine.fds_used} of ${isNum(h.engine.fds_budget) ? h.engine.fds_budget : DASH}`
    : DASH],
  ["health", (h) => (h.healthy === true ? "healthy"
    : h.healthy === false ? h.problems.join("; ") || "unhealthy" : DASH)],
];

function makeCard() {
  const card = el("div", "card");
  const title = el("h2");
  const list = el("dl");
  const values = CARD_FIELDS.map(([label]) => {
    const pair = el("div");
    const value = el("dd", "", DASH);
    pair.append(el("dt", "", label), value);
    list.append(pair);
    return value;
  });
  const error = el("p", "error");
  card.append(title, list, error);
  return { card, title, list, values, error };
}

function renderCards(model) {
  const seen = new Set();
  let previous = null;
  for (const host of model.hosts) {
    seen.add(host.key);
    let card = state.cards.get(host.key);
    if (!card) {
      card = makeCard();
      state.cards.set(host.key, card);
    }
    const wanted = previous ? previous.nextSibling : ui.hosts.firstChild;
    if (wanted !== card.card) ui.hosts.insertBefore(card.card, wanted);
    previous = card.card;
    setText(card.title, model.cluster ? `host ${host.key}` : "this host");
    if (!host.reachable) {
      setClass(card.card, "card unreachable");
      card.list.hidden = true;
      card.error.hidden = false;
      setText(card.error, `unreachable (${text(host.endpoint)}): ${text(host.error)}`);
      continue;
    }
    const healthy = host.healthy === false ? " unhealthy" : "";
    setClass(card.card, `card${healthy}`);
    card.list.hidden = false;
    card.error.hidden = true;
    CARD_FIELDS.forEach(([, show], index) => setText(card.values[index], show(host)));
  }
  for (const [key, card] of state.cards) {
    if (!seen.has(key)) {
      card.card.remove();
      state.cards.delete(key);
    }
  }
}

// -- the services table -------------------------------------------------------------------

const INSTANCE_HEADINGS = ["", "instance", "", "address", "host", "state", "image", "active",
  "failures", "req/s", "p99", "container", "", ""];

function twoLines(cell) {
  const first = el("span", "line");
  const second = el("span", "line dim");
  cell.append(first, second);
  return [first, second];
}

function makeSpark() {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", String(SPARK_W));
  svg.setAttribute("height", String(SPARK_H));
  svg.setAttribute("viewBox", `0 0 ${SPARK_W} ${SPARK_H}`);
  svg.setAttribute("role", "img");
  const title = document.createElementNS(SVG, "title");
  const total = document.createElementNS(SVG, "polyline");
  total.setAttribute("class", "total");
  const errors = document.createElementNS(SVG, "polyline");
  errors.setAttribute("class", "errors");
  svg.append(title, total, errors);
  return { svg, title, total, errors, version: -1 };
}

function makeServiceRow(key) {
  const tbody = el("tbody", "svc");
  const tr = el("tr", "service");
  const cells = {};
  const names = ["toggle", "name", "host", "address", "protocol", "state", "instances", "open",
    "conn", "req", "latency", "bytes", "failures", "chart"];
  for (const name of names) {
    cells[name] = el("td", name === "host" ? "col-host" : name);
    tr.append(cells[name]);
  }
  const toggle = el("button", "toggle");
  toggle.type = "button";
  cells.toggle.append(toggle);
  const nameText = el("span", "name");
  cells.name.append(nameText);
  const addressText = el("span", "line");
  const entries = el("span", "line dim");
  cells.address.append(addressText, entries);
  const stateText = el("span", "line");
  const reasonText = el("span", "line dim");
  cells.state.append(stateText, reasonText);
  const row = {
    key,
    tbody,
    tr,
    cells,
    toggle,
    nameText,
    addressText,
    entries,
    stateText,
    reasonText,
    conn: twoLines(cells.conn),
    req: twoLines(cells.req),
    latency: twoLines(cells.latency),
    bytes: twoLines(cells.bytes),
    failures: twoLines(cells.failures),
    spark: makeSpark(),
    head: null,
    instances: new Map(),
    service: null,
    hostKey: null,
    hasHistory: false,
    search: "",
  };
  cells.chart.append(row.spark.svg);
  toggle.addEventListener("click", () => {
    state.expanded.set(key, !isExpanded(row));
    updateInstances(row);
    rechartSoon();
  });
  tbody.append(tr);
  return row;
}

let collapsedByDefault = false;

function isExpanded(row) {
  return state.expanded.get(row.key) ?? !collapsedByDefault;
}

function requests(figures) {
  const rates = figures.req_rate;
  if (!isObj(rates)) return DASH;
  return CLASSES.map((code) => `${code} ${num(rates[code])}`).join(" ");
}

function entryPoints(service, publishIp) {
  return service.published.map((entry) => {
    const where = `${typeof publishIp === "string" ? publishIp : ""}:${text(entry.port)}`;
    const names = entry.hostnames.length ? ` ${entry.hostnames.join(", ")}` : "";
    const how = entry.state ? ` (${text(entry.state)}${entry.reason ? `: ${text(entry.reason)}` : ""})` : "";
    return `${where}${names}${how}`;
  }).join("; ");
}

function statesText(byState) {
  const parts = Object.entries(byState)
    .filter(([, count]) => isNum(count) && count > 0)
    .sort(([a], [b]) => (a === "live" ? -1 : b === "live" ? 1 : a.localeCompare(b)))
    .map(([name, count]) => `${count} ${name}`);
  return parts.length ? parts.join(" · ") : "none";
}

function updateServiceRow(row, host, service) {
  row.service = service;
  setText(row.nameText, service.name);
  setText(row.cells.host, text(host.key));
  setText(row.addressText, text(service.address));
  const published = entryPoints(service, host.publishIp);
  setText(row.entries, published);
  setText(row.cells.protocol, text(service.protocol));
  setText(row.stateText, text(service.state));
  setClass(row.cells.state, `state state-${token(service.state ?? "unknown")}`);
  setText(row.reasonText, service.reason ? text(service.reason) : "");
  setText(row.cells.instances, statesText(service.byState));
  setText(row.cells.open, text(service.connections_open));
  setText(row.conn[0], num(service.now.conn_rate));
  setText(row.conn[1], num(service.m5.conn_rate));
  setText(row.req[0], requests(service.now));
  setText(row.req[1], requests(service.m5));
  setText(row.latency[0], `${latency(service.now.p50)} · ${latency(service.now.p99)}`);
  setText(row.latency[1], `${latency(service.m5.p50)} · ${latency(service.m5.p99)}`);
  setText(row.bytes[0], bytes(service.now.bytes_rate));
  setText(row.bytes[1], bytes(service.m5.bytes_rate));
  setText(row.failures[0],
    `${num(service.now.connect_failures_rate)} · ${num(service.now.retries_rate)}`);
  setText(row.failures[1],
    `${num(service.m5.connect_failures_rate)} · ${num(service.m5.retries_rate)}`);
  row.search = [service.name, service.address, host.key, published,
    ...service.instances.flatMap((one) => [one.name, one.address, one.host, one.image,
      one.container_id])]
    .filter((part) => typeof part === "string").join("\n").toLowerCase();
  row.hostKey = host.key;
  row.hasHistory = host.hasHistory;
  updateInstances(row);
}

function makeInstanceRow() {
  const tr = el("tr", "instance");
  const cells = INSTANCE_HEADINGS.map(() => el("td"));
  tr.append(...cells);
  cells[2].className = "col-host";
  const nameText = el("span", "name");
  const ruleText = el("span", "line dim");
  cells[1].append(nameText, ruleText);
  const stateText = el("span", "line");
  const reasonText = el("span", "line dim");
  cells[5].append(stateText, reasonText);
  return { tr, cells, nameText, ruleText, stateText, reasonText };
}

function instanceReason(instance) {
  const parts = [];
  if (isNum(instance.retry_at)) parts.push(`until ${clock(instance.retry_at)}`);
  if (instance.reason) parts.push(text(instance.reason));
  return parts.join(": ");
}

function updateInstanceRow(view, instance) {
  setText(view.nameText, instance.name);
  setText(view.ruleText, instance.rule ? `rule ${text(instance.rule)}` : "");
  setText(view.cells[3], text(instance.address));
  setText(view.cells[4], text(instance.host));
  setText(view.stateText, text(instance.state));
  setClass(view.cells[5], `state state-${token(instance.state ?? "unknown")}`);
  setText(view.reasonText, instanceReason(instance));
  setText(view.cells[6], text(instance.image));
  setText(view.cells[7], text(instance.active));
  setText(view.cells[8], text(instance.failures));
  setText(view.cells[9], num(instance.req_rate));
  setText(view.cells[10], latency(instance.p99));
  const id = typeof instance.container_id === "string" ? instance.container_id.slice(0, 12) : null;
  setText(view.cells[11], text(id));
}

function updateInstances(row) {
  const expanded = isExpanded(row);
  setAttr(row.toggle, "aria-expanded", String(expanded));
  setText(row.toggle, expanded ? "▾" : "▸");
  setAttr(row.toggle, "aria-label", `${expanded ? "collapse" : "expand"} ${row.service.name}`);
  if (!expanded) {
    if (row.head) {
      row.head.remove();
      row.head = null;
    }
    for (const view of row.instances.values()) view.tr.remove();
    row.instances.clear();
    return;
  }
  if (!row.head) {
    row.head = el("tr", "instance-head");
    for (const heading of INSTANCE_HEADINGS) row.head.append(el("th", "", heading));
    row.head.children[2].className = "col-host";
    row.tbody.append(row.head);
  }
  const seen = new Set();
  let previous = row.head;
  for (const instance of row.service.instances) {
    seen.add(instance.name);
    let view = row.instances.get(instance.name);
    if (!view) {
      view = makeInstanceRow();
      row.instances.set(instance.name, view);
    }
    if (previous.nextSibling !== view.tr) row.tbody.insertBefore(view.tr, previous.nextSibling);
    previous = view.tr;
    updateInstanceRow(view, instance);
  }
  for (const [name, view] of row.instances) {
    if (!seen.has(name)) {
      view.tr.remove();
      row.instances.delete(name);
    }
  }
}

function renderServices(model) {
  const all = [];
  for (const host of model.hosts) for (const service of host.services) all.push([host, service]);
  collapsedByDefault = all.length > EXPAND_UP_TO;
  ui.table.classList.toggle("cluster", model.cluster);
  const seen = new Set();
  const order = [];
  let previous = ui.table.tHead;
  for (const [host, service] of all) {
    const key = `${host.key}\u0000${service.name}`;
    seen.add(key);
    let row = state.rows.get(key);
    if (!row) {
      row = makeServiceRow(key);
      state.rows.set(key, row);
    }
    if (previous.nextSibling !== row.tbody) ui.table.insertBefore(row.tbody, previous.nextSibling);
    previous = row.tbody;
    updateServiceRow(row, host, service);
    order.push(row);
  }
  state.order = order;
  for (const [key, row] of state.rows) {
    if (!seen.has(key)) {
      row.tbody.remove();
      state.rows.delete(key);
    }
  }
  applyFilter();
}

function applyFilter() {
  let shown = 0;
  for (const row of state.rows.values()) {
    const hide = state.filter !== "" && !row.search.includes(state.filter);
    if (row.tbody.hidden !== hide) row.tbody.hidden = hide;
    if (!hide) shown += 1;
  }
  ui.empty.hidden = shown > 0 || state.rows.size === 0;
}

// -- the charts: the last 15 minutes of /status/history ------------------------------------

function sampleValue(service, protocol) {
  const rates = obj(service.req_rate);
  if (protocol === "http") {
    const values = CLASSES.map((code) => rates[code]).filter(isNum);
    return values.length ? values.reduce((a, b) => a + b, 0) : null;
  }
  return isNum(service.conn_rate) ? service.conn_rate : null;
}

function points(values, top) {
  const step = values.length > 1 ? SPARK_W / (values.length - 1) : 0;
  return values
    .map((value, index) => (value === null ? null
      : `${(index * step).toFixed(1)},${(SPARK_H - 1 - (value / top) * (SPARK_H - 2)).toFixed(1)}`))
    .filter((point) => point !== null)
    .join(" ");
}

function clearSpark(spark, why) {
  if (spark.version !== -1) {
    spark.total.setAttribute("points", "");
    spark.errors.setAttribute("points", "");
    spark.version = -1;
  }
  setText(spark.title, why);
}

function updateSpark(row, series) {
  const spark = row.spark;
  if (spark.version === series.version) return;
  spark.version = series.version;
  const protocol = row.service.protocol;
  const totals = [];
  const errors = [];
  for (const sample of series.samples) {
    const figures = obj(sample.figures);
    totals.push(sampleValue(figures, protocol));
    const rate = obj(figures.req_rate)["5xx"];
    errors.push(protocol === "http" && isNum(rate) ? rate : null);
  }
  const top = Math.max(1e-9, ...totals.filter(isNum));
  setAttr(spark.total, "points", points(totals, top));
  setAttr(spark.errors, "points", points(errors, top));
  const what = protocol === "http" ? "requests/s (5xx in red)" : "connections/s";
  setText(spark.title, `${what}, last ${series.samples.length} samples, peak ${num(top)}`);
}

async function getJson(url) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
  try {
    const response = await fetch(url, {
      cache: "no-store",
      headers: { Accept: "application/json" },
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(`${url} answered ${response.status}`);
    const body = await response.text();
    return { body: JSON.parse(body), size: body.length };
  } catch (error) {
    if (error.name === "AbortError") throw new Error(`${url}: no answer in ${FETCH_TIMEOUT_MS / 1000} s`);
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

// The rows to chart, in table order: those shown on screen, then expanded ones elsewhere.
function rowsToChart() {
  const onScreen = [];
  const expanded = [];
  const bottom = window.innerHeight + ON_SCREEN_MARGIN;
  let below = false;
  for (const row of state.order) {
    if (row.tbody.hidden || !row.hasHistory) continue;
    if (!below) {
      const box = row.tr.getBoundingClientRect();
      if (box.top > bottom) below = true;
      else if (box.bottom >= -ON_SCREEN_MARGIN) {
        onScreen.push(row);
        continue;
      }
    }
    if (isExpanded(row)) expanded.push(row);
  }
  return [...onScreen, ...expanded].slice(0, CHART_UP_TO);
}

function historyOf(hostKey) {
  let history = state.history.get(hostKey);
  if (!history) {
    history = { capacity: HISTORY_SAMPLES, series: new Map() };
    state.history.set(hostKey, history);
  }
  return history;
}

function addSamples(hostKey, rawHistory, names) {
  const doc = obj(rawHistory);
  const history = historyOf(hostKey);
  if (isNum(doc.capacity) && doc.capacity > 0) history.capacity = doc.capacity;
  for (const name of names) {
    let series = history.series.get(name);
    if (!series) {
      series = { last: null, samples: [], version: 0 };
      history.series.set(name, series);
    }
    let added = false;
    for (const raw of arr(doc.samples)) {
      const sample = obj(raw);
      if (!isNum(sample.t) || (series.last !== null && sample.t <= series.last)) continue;
      series.samples.push({ t: sample.t, figures: obj(sample.services)[name] ?? null });
      series.last = sample.t;
      added = true;
    }
    if (series.samples.length > history.capacity) {
      series.samples.splice(0, series.samples.length - history.capacity);
    }
    if (added) series.version += 1;
  }
}

// One request for the services named: with since (what is newer than it) or without (all).
async function askHistory(cluster, names, since) {
  const params = new URLSearchParams();
  if (cluster) params.set("scope", "cluster");
  if (since !== null) params.set("since", String(since));
  for (const name of names) params.append("service", name);
  const { body, size } = await getJson(`/status/history?${params.toString()}`);
  const answers = new Map();
  if (!cluster) {
    answers.set(null, body);
  } else {
    for (const raw of arr(obj(body).hosts)) {
      const item = obj(raw);
      if (item.reachable !== false) answers.set(text(item.host), item.history ?? item.status);
    }
  }
  return { answers, size };
}

// Fetch what the charted rows lack, drop the series of rows no longer charted, redraw.
async function updateCharts(model) {
  const rows = rowsToChart();
  const wanted = new Map(); // host key -> names charted there
  for (const row of rows) {
    if (!wanted.has(row.hostKey)) wanted.set(row.hostKey, new Set());
    wanted.get(row.hostKey).add(row.service.name);
  }
  const known = new Set();
  const fresh = new Set();
  let since = null;
  for (const [hostKey, names] of wanted) {
    const series = historyOf(hostKey).series;
    for (const name of names) {
      const last = series.has(name) ? series.get(name).last : null;
      if (last === null) fresh.add(name);
      else {
        known.add(name);
        since = since === null ? last : Math.min(since, last);
      }
    }
  }
  let size = 0;
  const asks = [];
  if (known.size) asks.push([[...known], since]);
  if (fresh.size) asks.push([[...fresh], null]);
  for (const [names, after] of asks) {
    const { answers, size: got } = await askHistory(model.cluster, names, after);
    size += got;
    for (const [hostKey, doc] of answers) {
      const key = hostKey ?? model.hosts[0].key;
      const charted = wanted.get(key);
      if (charted) addSamples(key, doc, names.filter((name) => charted.has(name)));
    }
  }
  for (const [hostKey, history] of state.history) {
    const names = wanted.get(hostKey);
    for (const name of history.series.keys()) {
      if (!names || !names.has(name)) history.series.delete(name);
    }
    if (!history.series.size) state.history.delete(hostKey);
  }
  const drawn = new Set();
  for (const row of rows) {
    const series = historyOf(row.hostKey).series.get(row.service.name);
    if (!series) continue;
    updateSpark(row, series);
    drawn.add(row.key);
  }
  for (const row of state.order) {
    if (drawn.has(row.key)) continue;
    clearSpark(row.spark, row.hasHistory
      ? `charted when on screen or expanded (${CHART_UP_TO} at most)`
      : "no history from this fluxd");
  }
  state.charted = drawn;
  return size;
}

function rechartSoon() {
  clearTimeout(state.rechartTimer);
  state.rechartTimer = setTimeout(async () => {
    if (!state.model) return;
    try {
      await updateCharts(state.model);
    } catch (error) {
      console.warn(`history: ${error.message}`);
    }
  }, RECHART_MS);
}

// -- the refresh loop and the "as of" marker -----------------------------------------------

function showAsOf() {
  const age = Date.now() - state.lastOk;
  const stale = state.error !== null || (state.lastOk > 0 && age > STALE_MS);
  let shown = state.asOf === null ? "no answer yet" : `as of ${clock(state.asOf)}`;
  if (stale) {
    shown += state.error !== null ? ` — stale: ${state.error}`
      : ` — stale: no answer for ${Math.round(age / 1000)} s`;
  }
  setText(ui.asof, shown);
  setClass(ui.asof, stale ? "asof stale" : "asof");
}

async function refresh() {
  const generation = state.generation;
  const started = performance.now();
  try {
    const url = state.scope === "cluster" ? "/status?scope=cluster" : "/status";
    const { body, size } = await getJson(url);
    if (generation !== state.generation) return;
    const model = toModel(body);
    if (state.scope === "cluster" && !model.cluster) {
      ui.notice.hidden = false;
      setText(ui.notice, "this fluxd does not serve the cluster view; showing this host only");
    } else {
      ui.notice.hidden = true;
    }
    const rendering = performance.now();
    renderCards(model);
    renderServices(model);
    state.model = model;
    const rendered = performance.now();
    let historyBytes = 0;
    try {
      historyBytes = await updateCharts(model);
    } catch (error) {
      console.warn(`history: ${error.message}`);
    }
    if (generation !== state.generation) return;
    const done = performance.now();
    const stats = document.body.dataset;
    stats.renders = String(Number(stats.renders ?? 0) + 1);
    stats.renderMs = (rendered - rendering).toFixed(1);
    stats.refreshMs = (done - started).toFixed(1);
    stats.jsonBytes = String(size);
    stats.historyBytes = String(historyBytes);
    stats.charted = String(state.charted.size);
    state.lastOk = Date.now();
    state.asOf = model.now;
    state.error = null;
  } catch (error) {
    if (generation === state.generation) state.error = error.message || String(error);
  } finally {
    if (generation === state.generation) {
      showAsOf();
      state.timer = setTimeout(refresh, REFRESH_MS);
    }
  }
}

function restart() {
  state.generation += 1;
  clearTimeout(state.timer);
  refresh();
}

function setScope(scope) {
  state.scope = scope;
  sessionStorage.setItem("flux.scope", scope);
  ui.scopeHost.setAttribute("aria-pressed", String(scope === "host"));
  ui.scopeCluster.setAttribute("aria-pressed", String(scope === "cluster"));
}

function start() {
  ui.filter = document.getElementById("filter");
  ui.scopeHost = document.getElementById("scope-host");
  ui.scopeCluster = document.getElementById("scope-cluster");
  ui.asof = document.getElementById("asof");
  ui.hosts = document.getElementById("hosts");
  ui.notice = document.getElementById("notice");
  ui.table = document.getElementById("services");
  ui.empty = document.getElementById("empty");
  setScope(sessionStorage.getItem("flux.scope") === "cluster" ? "cluster" : "host");
  state.filter = (sessionStorage.getItem("flux.filter") ?? "").trim().toLowerCase();
  ui.filter.value = sessionStorage.getItem("flux.filter") ?? "";
  ui.filter.addEventListener("input", () => {
    sessionStorage.setItem("flux.filter", ui.filter.value);
    state.filter = ui.filter.value.trim().toLowerCase();
    applyFilter();
    rechartSoon();
  });
  window.addEventListener("scroll", rechartSoon, { passive: true });
  window.addEventListener("resize", rechartSoon, { passive: true });
  for (const [button, scope] of [[ui.scopeHost, "host"], [ui.scopeCluster, "cluster"]]) {
    button.addEventListener("click", () => {
      if (state.scope === scope) return;
      setScope(scope);
      restart();
    });
  }
  setInterval(showAsOf, 1000);
  refresh();
}

document.addEventListener("DOMContentLoaded", start);
