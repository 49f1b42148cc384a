// Projections and rebuilds: GET /v1/projections polled, charts of events/s and lag, the
// parked streams with retry and discard, and rebuilds asked for and followed (admin).
import { call, follow } from './api.js';
import { History, lineChart } from './chart.js';
import { badge, describe, h, num, replace, seconds, stats, table, time } from './dom.js';
import { mountGuarded, refusedBy } from './guard.js';

// Shared by both panels, kept while the tab is open.
const history = new History(90);
const last = new Map(); // projection -> {t, events, generation}
const swaps = [];
const asked = new Map(); // request location -> request
let latest = null;
let error = null;
// Status lines of the actions, kept across re-renders so a request stays followed.
const statuses = new Map();
function statusFor(key) {
  if (!statuses.has(key)) statuses.set(key, h('p', { class: 'muted', role: 'status' }));
  return statuses.get(key);
}

async function poll() {
  try {
    const { data } = await call('/v1/projections');
    const t = Date.now();
    for (const p of data.projections) {
      const before = last.get(p.name);
      if (before) {
        const rate = Math.max(0, (p.events - before.events) / ((t - before.t) / 1000));
        if (p.generation === before.generation) history.push(`${p.name}:rate`, t, rate);
        if (p.generation > before.generation) {
          swaps.unshift({ at: new Date(t), projection: p.name, from: before.generation, to: p.generation });
        }
      }
      history.push(`${p.name}:lag`, t, p.lag ?? NaN);
      for (const part of p.partitions) {
        history.push(`${p.name}:lag:${part.topic}/${part.partition}`, t, part.lag ?? NaN);
      }
      if (p.rebuild) history.push(`${p.name}:rebuild`, t, p.rebuild.events_per_second ?? NaN);
      last.set(p.name, { t, events: p.events, generation: p.generation });
    }
    latest = data.projections;
    error = null;
  } catch (e) {
    error = e;
  }
}

function rateOf(name) {
  const points = history.points(`${name}:rate`);
  return points.length ? points[points.length - 1][1] : null;
}

function failure(into) {
  if (!error) return false;
  replace(into, h('p', { class: 'error', role: 'alert' }, refusedBy(error, 'admin') ?? describe(error)));
  return true;
}

function stateBadge(p) {
  if (p.state === 'running' && !p.parked_streams) return badge('running', 'ok');
  if (p.state === 'running') return badge(`running, ${p.parked_streams} parked`, 'warn');
  return badge(p.state, 'bad');
}

function requestLine(request) {
  const outcome = request.outcome ? ` – ${request.outcome}` : '';
  return `request ${request.id} by ${request.actor}: ${request.state}${outcome}`;
}

/** Sends an admin request and follows it, writing its state into `status`. */
async function ask(path, body, status) {
  replace(status, 'asking…');
  try {
    const { data, headers } = await call(path, { method: 'POST', body });
    const where = headers.get('location');
    asked.set(where, data);
    replace(status, requestLine(data));
    const done = await follow(where, (r) => { asked.set(where, r); replace(status, requestLine(r)); });
    return done;
  } catch (e) {
    replace(status, h('span', { class: 'error' }, refusedBy(e, 'admin') ?? describe(e)));
    return null;
  }
}

/** The requests this tab sent, newest first, with where each stands. */
function requestsLog() {
  const all = [...asked.values()].reverse();
  if (!all.length) return null;
  return h('section', { class: 'card', 'aria-labelledby': 'asked-title' },
    h('h3', { id: 'asked-title' }, 'Requests from this tab'),
    h('ul', { class: 'log' }, all.map((r) => h('li', {},
      `${r.action ? `${r.action} ${r.stream_type}/${r.stream_id}` : `rebuild ${r.projection}`}: ${requestLine(r)}`))));
}

function parkedTable(p) {
  const parked = p.partitions.flatMap((part) => part.parked);
  if (!parked.length) return null;
  return h('div', {},
    h('h4', {}, `Parked streams (${p.parked_streams})`),
    table(null, [
      ['Stream', (s) => h('code', {}, `${s.stream_type}/${s.stream_id}`)],
      ['Held back', (s) => `${s.records} from offset ${s.first_offset} (${s.topic}/${s.partition})`],
      ['Error', (s) => h('span', { class: 'mono' }, s.error)],
      ['Since', (s) => time(s.parked_at), 'hide-narrow'],
      ['Actions', (s) => parkedActions(p.name, s)],
    ], parked));
}

function parkedActions(projection, s) {
  const status = statusFor(`parked:${projection}:${s.stream_type}/${s.stream_id}`);
  const base = `/v1/projections/${encodeURIComponent(projection)}/parked/${encodeURIComponent(s.stream_type)}/${encodeURIComponent(s.stream_id)}`;
  const reasonId = `reason-${projection}-${s.stream_type}-${s.stream_id}`.replace(/[^A-Za-z0-9_-]/g, '_');
  const reason = h('input', { id: reasonId, type: 'text', maxlength: 1000, required: true });
  return h('div', {},
    h('div', { class: 'actions' },
      h('button', { type: 'button', id: `retry-${reasonId}`, onclick: () => ask(`${base}/retry`, {}, status) }, 'Retry'),
    ),
    h('form', { class: 'actions', onsubmit: (e) => { e.preventDefault(); ask(`${base}/discard`, { reason: reason.value }, status); } },
      h('div', {}, h('label', { for: reasonId }, 'Reason to discard'), reason),
      h('button', { type: 'submit', class: 'danger', id: `discard-${reasonId}` }, 'Discard')),
    status);
}

/** A topic's name without the deployment's prefix: `order.events` for `keel.order.events`. */
function shortTopic(topic) {
  return topic.split('.').slice(-2).join('.');
}

function projectionCard(p) {
  const status = statusFor(`rebuild:${p.name}`);
  const keepId = `keep-old-${p.name}`;
  const keep = h('input', { type: 'checkbox', id: keepId });
  return h('article', { class: 'card', 'aria-labelledby': `p-${p.name}` },
    h('h3', { id: `p-${p.name}` }, p.name, ' ', stateBadge(p)),
    p.error ? h('p', { class: 'error' }, p.error) : null,
    stats([
      ['Generation', `${p.generation} (code v${p.code_version})`],
      ['Events', num(p.events)],
      ['Events/s', num(rateOf(p.name), 1)],
      ['Lag (records)', num(p.lag)],
      ['Dead letters', num(p.dead_letters)],
    ]),
    lineChart(`${p.name} events per second`, [
      { name: 'events/s', points: history.points(`${p.name}:rate`) },
    ]),
    lineChart(`${p.name} lag per partition, in records`, p.partitions.map((x) => ({
      name: `${shortTopic(x.topic)}/${x.partition}`, points: history.points(`${p.name}:lag:${x.topic}/${x.partition}`),
    }))),
    table('Partitions', [
      ['Partition', (x) => h('span', { title: x.topic }, `${shortTopic(x.topic)}/${x.partition}`)],
      ['Checkpoint', (x) => num(x.next_offset), 'num'],
      ['Lag', (x) => num(x.lag), 'num'],
      ['Behind', (x) => seconds(x.lag_seconds), 'num hide-narrow'],
      ['Held by', (x) => x.held_by ?? '–', 'hide-narrow'],
      ['Parked', (x) => num(x.parked_streams), 'num'],
    ], p.partitions, 'No partition read yet.'),
    parkedTable(p),
    h('form', { class: 'actions', onsubmit: (e) => { e.preventDefault(); ask(`/v1/projections/${encodeURIComponent(p.name)}/rebuild`, { keep_old: keep.checked }, status); } },
      h('button', { type: 'submit', id: `rebuild-${p.name}` }, `Rebuild ${p.name}`),
      h('span', {}, keep, ' ', h('label', { for: keepId, class: 'inline' }, 'keep the old generation'))),
    status);
}

export const projections = {
  mount(container) {
    mountGuarded(this, container, 'admin', 'Projections');
  },
  async refresh() {
    if (!this.active) return;
    await poll();
    if (failure(this.body)) return;
    // Not while the operator types in the panel; a focused button keeps the focus.
    const focused = document.activeElement;
    if (this.body.contains(focused) && ['INPUT', 'SELECT', 'TEXTAREA'].includes(focused.tagName)) return;
    const keep = this.body.contains(focused) ? focused.id : null;
    replace(this.body, requestsLog(), h('div', { class: 'grid' }, latest.map(projectionCard)));
    if (keep && document.getElementById(keep)) document.getElementById(keep).focus();
  },
};

export const rebuilds = {
  mount(container) {
    mountGuarded(this, container, 'admin', 'Rebuilds');
  },
  async refresh() {
    if (!this.active) return;
    await poll();
    if (failure(this.body)) return;
    const running = latest.filter((p) => p.rebuild);
    replace(this.body,
      running.length ? h('div', { class: 'grid' }, running.map((p) => {
        const r = p.rebuild;
        const done = r.records_total ? r.records_done / r.records_total : 0;
        return h('article', { class: 'card', 'aria-labelledby': `r-${p.name}` },
          h('h3', { id: `r-${p.name}` }, `${p.name}: generation ${r.generation} `, badge(r.state, r.state === 'building' ? 'ok' : 'bad')),
          h('label', { for: `progress-${p.name}` }, `${num(r.records_done)} of ${num(r.records_total)} records (${num(done * 100, 1)}%)`),
          h('progress', { id: `progress-${p.name}`, max: r.records_total || 1, value: r.records_done }),
          stats([
            ['Events/s', num(r.events_per_second, 0)],
            ['ETA', seconds(r.eta_seconds)],
            ['Events', num(r.events)],
            ['Processes filling it', num(r.helpers)],
            ['Coordinator', r.owner],
            ['Started', time(r.started_at)],
          ]),
          r.error ? h('p', { class: 'error' }, r.error) : null,
          lineChart(`${p.name} rebuild events per second`, [{ name: 'events/s', points: history.points(`${p.name}:rebuild`) }]));
      })) : h('p', {}, 'No rebuild is running. Start one from the Projections panel.'),
      h('h3', {}, 'Swaps seen'),
      swaps.length ? h('ul', { class: 'log' }, swaps.map((s) => h('li', {}, `${s.at.toLocaleTimeString()}: ${s.projection} swapped generation ${s.from} for ${s.to}`)))
        : h('p', { class: 'muted' }, 'None while this page has been open.'),
      h('h3', {}, 'Rebuilds asked from this tab'),
      table(null, [
        ['Request', (r) => String(r.id)],
        ['Kind', (r) => (r.action ? `${r.action} ${r.stream_type}/${r.stream_id}` : `rebuild ${r.projection}`)],
        ['Actor', (r) => r.actor],
        ['State', (r) => r.state],
        ['Outcome', (r) => r.outcome ?? '–'],
      ], [...asked.values()].filter((r) => !r.action).reverse(), 'None yet.'));
  },
};
