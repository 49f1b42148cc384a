// The write path, from the command API (cross-origin: it must allow this page's origin,
// KEEL_CORS_ORIGINS): its partitions with their owners and epochs (GET /v1/partitions,
// admin), and the commands it answered by outcome (GET /metrics, keel_commands_total).
import { call, commandApi } from './api.js';
import { History, lineChart } from './chart.js';
import { badge, describe, h, num, replace, stats, table } from './dom.js';
import { mountGuarded, refusedBy } from './guard.js';

const history = new History(90);
let previous = null;

/** keel_commands_total samples of a Prometheus text exposition: {command, outcome, value}. */
export function commandCounts(text) {
  const out = [];
  for (const line of text.split('\n')) {
    const m = /^keel_commands_total\{([^}]*)\} ([0-9.eE+-]+)$/.exec(line.trim());
    if (!m) continue;
    const labels = Object.fromEntries([...m[1].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((x) => [x[1], x[2]]));
    out.push({ command: labels.command, outcome: labels.outcome, value: Number(m[2]) });
  }
  return out;
}

function statusBadge(s) {
  if (s === 'serving') return badge(s, 'ok');
  if (s === 'elsewhere') return badge(s, 'ok');
  if (s === 'catching_up' || s === 'starting') return badge(s, 'warn');
  return badge(s, 'bad');
}

export const writePath = {
  mount(container) {
    mountGuarded(this, container, 'admin', 'Write path');
  },
  async refresh() {
    if (!this.active) return;
    const base = commandApi();
    if (!base) {
      replace(this.body, h('p', { class: 'notice' },
        'The query API was not told where the command API is: start it with KEEL_CONSOLE_COMMAND_API set to the command API\'s URL as a browser reaches it, and the command API with KEEL_CORS_ORIGINS naming this page\'s origin.'));
      return;
    }
    let partitions;
    let counts = null;
    try {
      partitions = (await call(`${base}/v1/partitions`)).data;
    } catch (e) {
      replace(this.body, h('p', { class: 'error', role: 'alert' }, refusedBy(e, 'admin') ?? describe(e)));
      return;
    }
    try {
      counts = commandCounts((await call(`${base}/metrics`)).data);
    } catch (e) {
      counts = null;
    }
    const t = Date.now();
    const byOutcome = new Map();
    for (const c of counts ?? []) byOutcome.set(c.outcome, (byOutcome.get(c.outcome) ?? 0) + c.value);
    if (previous && counts) {
      const dt = (t - previous.t) / 1000;
      for (const [outcome, total] of byOutcome) {
        history.push(outcome, t, Math.max(0, (total - (previous.totals.get(outcome) ?? 0)) / dt));
      }
    }
    if (counts) previous = { t, totals: byOutcome };
    // Outcomes this instance has answered with (a line of zeros for the rest says nothing).
    const outcomes = [...byOutcome.keys()].filter((o) => byOutcome.get(o) > 0).sort();
    const all = partitions.partitions;
    const serving = all.filter((p) => p.status === 'serving').length;
    replace(this.body,
      stats([
        ['Instance', partitions.instance],
        ['Assignment', partitions.assignment],
        ['Partitions served here', `${serving} of ${all.length}`],
        ['Commands answered', counts ? num([...byOutcome.values()].reduce((a, b) => a + b, 0)) : 'metrics not readable'],
      ]),
      partitions.group ? h('p', {}, `Group ${partitions.group.id}: ${partitions.group.state ?? '?'}, ${(partitions.group.members ?? []).length} members`) : null,
      h('div', { class: 'card' },
        h('h3', {}, 'Commands per second by outcome'),
        counts ? lineChart('commands per second by outcome', outcomes.map((o) => ({ name: o, points: history.points(o) })))
          : h('p', { class: 'muted' }, 'The command API\'s /metrics could not be read from this page.')),
      table('Partitions and their owners', [
        ['Partition', (p) => `${p.topic}/${p.partition}`],
        ['State', (p) => statusBadge(p.status)],
        ['Writer', (p) => p.writer ?? '–'],
        ['Epoch', (p) => (p.epoch === undefined || p.epoch === null ? '–' : String(p.epoch)), 'num'],
        ['Owner', (p) => p.owner_url ?? (p.status === 'serving' ? 'this instance' : '–'), 'hide-narrow'],
      ], all),
      counts ? table('Commands answered by type and outcome', [
        ['Command', (c) => c.command],
        ['Outcome', (c) => c.outcome],
        ['Count', (c) => num(c.value), 'num'],
      ], counts.filter((c) => c.value > 0), 'No command answered yet.') : null);
  },
};
