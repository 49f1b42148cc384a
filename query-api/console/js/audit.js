// The audit trail: search events (GET /v1/audit/events), a stream's timeline of commits
// (GET /v1/audit/streams/{type}/{id}), its state at any version (…/state?version=) with a
// diff between two versions, and a verification of the stream against the log (admin:
// POST …/verify, followed to its report).
import { call, follow, holds, withQuery } from './api.js';
import { describe, h, replace, table, time } from './dom.js';
import { refusal, refusedBy } from './guard.js';

const TYPES = ['order', 'product', 'customer'];

/** Every leaf of `value` as [path, text] pairs, in order. */
export function flatten(value, prefix = '') {
  if (value === null || typeof value !== 'object') return [[prefix || '(value)', JSON.stringify(value)]];
  const entries = Array.isArray(value) ? value.map((v, i) => [String(i), v]) : Object.entries(value);
  if (!entries.length) return [[prefix || '(value)', Array.isArray(value) ? '[]' : '{}']];
  return entries.flatMap(([k, v]) => flatten(v, prefix ? `${prefix}.${k}` : k));
}

/** What changed from `before` to `after`: [path, before text | null, after text | null]. */
export function diff(before, after) {
  const a = new Map(flatten(before));
  const b = new Map(flatten(after));
  const paths = [...new Set([...a.keys(), ...b.keys()])].sort();
  return paths.filter((p) => a.get(p) !== b.get(p)).map((p) => [p, a.get(p) ?? null, b.get(p) ?? null]);
}

function stateTable(state) {
  return table(null, [
    ['Field', ([path]) => h('code', {}, path)],
    ['Value', ([, value]) => h('span', { class: 'mono' }, value)],
  ], flatten(state));
}

function signature(e) {
  return e.signature ? `signed (key ${e.signature.key_id})` : 'unsigned (legacy)';
}

function shortHash(hash) {
  return hash ? `${String(hash).slice(0, 12)}…` : '–';
}

export const audit = {
  mount(container, args) {
    const refused = refusal('audit:read', 'The audit panel');
    this.search = h('div', {});
    this.stream = h('div', {});
    replace(container, h('h2', {}, 'Audit trail'), refused ?? [this.searchForm(), this.search, this.openForm(args), this.stream]);
    if (!refused && args.length >= 2) this.open(args[0], args.slice(1).join('/'));
  },

  typeSelect(id, withAny) {
    return h('select', { id, name: id },
      withAny ? h('option', { value: '' }, 'any') : null,
      TYPES.map((t) => h('option', { value: t }, t)));
  },

  searchForm() {
    const field = (id, label, type = 'text') => h('div', {}, h('label', { for: id }, label), h('input', { id, name: id, type }));
    const form = h('form', { class: 'card', 'aria-labelledby': 'search-title' },
      h('h3', { id: 'search-title' }, 'Search events'),
      h('div', { class: 'row' },
        h('div', {}, h('label', { for: 'q-stream-type' }, 'Stream type'), this.typeSelect('q-stream-type', true)),
        field('q-event-type', 'Event type'),
        field('q-actor', 'Actor'),
        field('q-from', 'From (local time)', 'datetime-local'),
        field('q-to', 'To (local time)', 'datetime-local'),
        h('button', { type: 'submit' }, 'Search')));
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const v = (id) => form.querySelector(`#${id}`).value;
      const iso = (local) => (local ? new Date(local).toISOString() : '');
      this.runSearch({ stream_type: v('q-stream-type'), event_type: v('q-event-type'), actor: v('q-actor'), from: iso(v('q-from')), to: iso(v('q-to')), limit: 20 }, []);
    });
    return form;
  },

  async runSearch(params, cursors) {
    replace(this.search, h('p', { class: 'muted' }, 'Searching…'));
    try {
      const { data } = await call(withQuery('/v1/audit/events', { ...params, cursor: cursors[cursors.length - 1] }));
      replace(this.search,
        table(`Events (page ${cursors.length + 1})`, [
          ['Recorded', (e) => time(e.recorded_at)],
          ['Stream', (e) => h('a', { href: `#audit/${encodeURIComponent(e.stream_type)}/${encodeURIComponent(e.stream_id)}` }, `${e.stream_type}/${e.stream_id}`)],
          ['Version', (e) => String(e.version), 'num'],
          ['Event', (e) => e.event_type],
          ['Actor', (e) => e.actor],
        ], data.items, 'No event matches.'),
        h('div', { class: 'actions' },
          cursors.length ? h('button', { type: 'button', class: 'secondary', onclick: () => this.runSearch(params, cursors.slice(0, -1)) }, 'Previous page') : null,
          data.next_cursor ? h('button', { type: 'button', class: 'secondary', onclick: () => this.runSearch(params, [...cursors, data.next_cursor]) }, 'Next page') : null));
    } catch (e) {
      replace(this.search, h('p', { class: 'error', role: 'alert' }, refusedBy(e, 'audit:read') ?? describe(e)));
    }
  },

  openForm(args) {
    const id = h('input', { id: 'o-id', name: 'o-id', type: 'text', required: true, value: args.slice(1).join('/') || null });
    const type = this.typeSelect('o-type', false);
    if (args[0]) type.value = args[0];
    const form = h('form', { class: 'card', 'aria-labelledby': 'open-title' },
      h('h3', { id: 'open-title' }, 'Open a stream'),
      h('div', { class: 'row' },
        h('div', {}, h('label', { for: 'o-type' }, 'Stream type'), type),
        h('div', {}, h('label', { for: 'o-id' }, 'Stream id'), id),
        h('button', { type: 'submit' }, 'Open')));
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      location.hash = `#audit/${type.value}/${encodeURIComponent(id.value)}`;
    });
    return form;
  },

  async open(type, id) {
    replace(this.stream, h('p', { class: 'muted' }, 'Loading the stream…'));
    const base = `/v1/audit/streams/${encodeURIComponent(type)}/${encodeURIComponent(id)}`;
    let events = [];
    try {
      let cursor = null;
      do {
        const { data } = await call(withQuery(base, { limit: 500, cursor }));
        events = events.concat(data.items);
        cursor = data.next_cursor;
      } while (cursor && events.length < 5000);
    } catch (e) {
      replace(this.stream, h('p', { class: 'error', role: 'alert' }, refusedBy(e, 'audit:read') ?? describe(e)));
      return;
    }
    if (!events.length) {
      replace(this.stream, h('p', {}, `No stream ${type}/${id} in the audit trail.`));
      return;
    }
    const last = events[events.length - 1].version;
    const stateBox = h('div', { 'aria-live': 'polite' });
    const sliderLabel = h('label', { for: 'version' }, `State at version ${last} of ${last}`);
    const slider = h('input', { id: 'version', class: 'slider', type: 'range', min: 1, max: last, value: last, step: 1 });
    const timeline = h('ol', { class: 'timeline', 'aria-label': 'Commits, oldest first' });
    const showAt = async (version) => {
      sliderLabel.textContent = `State at version ${version} of ${last}`;
      timeline.querySelectorAll('li').forEach((li) => li.classList.toggle('selected', Number(li.dataset.version) === version));
      try {
        const { data } = await call(withQuery(`${base}/state`, { version }));
        if (Number(slider.value) !== version) return;
        replace(stateBox, h('p', { class: 'muted' }, `As of ${time(data.recorded_at)}`), stateTable(data.state));
      } catch (e) {
        replace(stateBox, h('p', { class: 'error' }, describe(e)));
      }
    };
    slider.addEventListener('input', () => showAt(Number(slider.value)));
    // The commits: events of one commit share its id.
    const commits = [];
    for (const e of events) {
      const c = commits[commits.length - 1];
      if (c && c.commit_id === e.commit_id) c.events.push(e); else commits.push({ ...e, events: [e] });
    }
    replace(timeline, commits.map((c) => h('li', { dataset: { version: String(c.events[c.events.length - 1].version) } },
      h('strong', {}, `v${c.events.map((e) => e.version).join(', ')}: ${c.events.map((e) => e.event_type).join(', ')}`),
      h('div', {}, `${c.command_type ?? 'command'} by ${c.actor}, ${time(c.recorded_at)}`),
      h('div', { class: 'muted' }, 'correlation ', h('code', {}, c.correlation_id ?? '–'), c.causation_id ? [' · causation ', h('code', {}, c.causation_id)] : null),
      h('div', { class: 'muted' }, 'hash ', h('code', { title: c.hash }, shortHash(c.hash)), ' · ', signature(c), ` · ${c.topic}/${c.partition}@${c.offset}`),
      h('button', { type: 'button', class: 'secondary', onclick: () => { slider.value = String(c.events[c.events.length - 1].version); showAt(Number(slider.value)); } }, 'Show this version'))));
    const versions = events.map((e) => e.version);
    const pick = (pid, label, value) => h('div', {}, h('label', { for: pid }, label),
      h('select', { id: pid }, versions.map((v) => h('option', { value: v, selected: v === value }, `version ${v}`))));
    const diffBox = h('div', { 'aria-live': 'polite' });
    const diffForm = h('form', { class: 'row' }, pick('diff-from', 'From', Math.max(1, last - 1)), pick('diff-to', 'To', last), h('button', { type: 'submit' }, 'Compare'));
    diffForm.addEventListener('submit', async (e) => {
      e.preventDefault();
      const from = diffForm.querySelector('#diff-from').value;
      const to = diffForm.querySelector('#diff-to').value;
      try {
        const [a, b] = await Promise.all([from, to].map((v) => call(withQuery(`${base}/state`, { version: v }))));
        const changes = diff(a.data.state, b.data.state);
        replace(diffBox, table(`From version ${from} to ${to}`, [
          ['Field', ([p]) => h('code', {}, p)],
          ['Before', ([, x]) => (x === null ? h('span', { class: 'muted' }, 'absent') : h('del', {}, x))],
          ['After', ([, , y]) => (y === null ? h('span', { class: 'muted' }, 'absent') : h('ins', {}, y))],
        ], changes, 'No field differs.'));
      } catch (err) {
        replace(diffBox, h('p', { class: 'error' }, describe(err)));
      }
    });
    const verifyBox = h('div', { 'aria-live': 'polite' });
    const verify = holds('admin')
      ? h('button', { type: 'button', onclick: () => this.verify(type, id, verifyBox) }, 'Verify against the log')
      : h('p', { class: 'muted' }, 'Verifying against the log needs the admin role.');
    replace(this.stream,
      h('section', { class: 'card', 'aria-labelledby': 'stream-title' },
        h('h3', { id: 'stream-title' }, `${type}/${id}: ${events.length} events in ${commits.length} commits`),
        h('div', { class: 'actions' }, verify), verifyBox,
        h('div', { class: 'grid' },
          h('div', {}, h('h4', {}, 'Timeline'), timeline),
          h('div', {}, h('h4', {}, 'State'), sliderLabel, slider, stateBox,
            h('h4', {}, 'Difference between two versions'), diffForm, diffBox))));
    showAt(last);
  },

  async verify(type, id, box) {
    replace(box, h('p', { role: 'status' }, 'Verification asked for…'));
    try {
      const path = `/v1/audit/streams/${encodeURIComponent(type)}/${encodeURIComponent(id)}/verify`;
      const { headers } = await call(path, { method: 'POST', body: {} });
      const done = await follow(headers.get('location'), (r) => replace(box, h('p', { role: 'status' }, `Verification ${r.id}: ${r.state}`)));
      const findings = done.report ? done.report.findings : [];
      replace(box, h('div', { class: done.ok ? 'verified' : 'refused', role: 'status' },
        h('p', {}, h('strong', {}, done.ok ? 'Verified. ' : 'Not verified. '), done.outcome ?? ''),
        table('Findings', [
          ['Kind', (f) => f.kind],
          ['Version', (f) => (f.version === null ? '–' : String(f.version))],
          ['Where', (f) => `${f.topic}/${f.partition}@${f.offset ?? '?'}`],
          ['Detail', (f) => f.detail],
        ], findings, 'No finding.')));
    } catch (e) {
      replace(box, h('p', { class: 'error', role: 'alert' }, refusedBy(e, 'admin') ?? describe(e)));
    }
  },
};
