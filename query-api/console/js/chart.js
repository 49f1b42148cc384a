// Line charts drawn as SVG: no library. Each chart says its latest values in its accessible
// name, so a screen reader hears what the eye sees.
import { h, num } from './dom.js';

const COLOURS = ['#1f4e79', '#c0504d', '#1a6b35', '#8a5300', '#6a3d9a', '#2b7a8c', '#9c2f6f', '#4d4d4d'];

/** A chart of `series` ([{name, points: [[t, v]…], unit}]) over the same time window. */
export function lineChart(title, series, { width = 480, height = 140 } = {}) {
  const pad = { left: 44, right: 8, top: 8, bottom: 18 };
  const all = series.flatMap((s) => s.points);
  const ts = all.map(([t]) => t);
  const vs = all.map(([, v]) => v).filter((v) => Number.isFinite(v));
  const t0 = Math.min(...ts, Date.now() - 60_000);
  const t1 = Math.max(...ts, t0 + 1);
  const vmax = Math.max(1, ...vs);
  const x = (t) => pad.left + ((t - t0) / (t1 - t0)) * (width - pad.left - pad.right);
  const y = (v) => height - pad.bottom - (v / vmax) * (height - pad.top - pad.bottom);
  const latest = series.map((s) => {
    const last = s.points[s.points.length - 1];
    return `${s.name} ${last ? num(last[1], 1) : 'no data'}${s.unit ? ' ' + s.unit : ''}`;
  }).join(', ');
  const svg = h('svg', {
    class: 'chart', viewBox: `0 0 ${width} ${height}`, role: 'img',
    'aria-label': `${title}: ${latest}`,
  },
  h('title', {}, `${title}: ${latest}`),
  h('line', { class: 'axis', x1: pad.left, y1: height - pad.bottom, x2: width - pad.right, y2: height - pad.bottom }),
  h('line', { class: 'axis', x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom }),
  h('text', { x: pad.left - 4, y: pad.top + 8, 'text-anchor': 'end' }, num(vmax, vmax < 10 ? 1 : 0)),
  h('text', { x: pad.left - 4, y: height - pad.bottom, 'text-anchor': 'end' }, '0'),
  h('text', { x: pad.left, y: height - 4 }, `${Math.round((t1 - t0) / 1000)} s ago`),
  h('text', { x: width - pad.right, y: height - 4, 'text-anchor': 'end' }, 'now'),
  series.map((s, i) => h('polyline', {
    fill: 'none', stroke: COLOURS[i % COLOURS.length], 'stroke-width': 2,
    points: s.points.filter(([, v]) => Number.isFinite(v)).map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(' '),
  })));
  const legend = h('ul', { class: 'legend' }, series.map((s, i) => h('li', {},
    h('span', { class: 'swatch', style: null, 'aria-hidden': 'true', dataset: { colour: String(i) } }), s.name)));
  // The swatches' colours, set as properties (the CSP allows no inline style attribute).
  legend.querySelectorAll('.swatch').forEach((el) => { el.style.background = COLOURS[Number(el.dataset.colour) % COLOURS.length]; });
  return h('figure', { class: 'chart-figure' }, svg, legend);
}

/** Keeps the last `size` samples of named series. */
export class History {
  constructor(size = 90) { this.size = size; this.series = new Map(); }
  push(name, t, v) {
    const points = this.series.get(name) ?? [];
    points.push([t, v]);
    while (points.length > this.size) points.shift();
    this.series.set(name, points);
  }
  points(name) { return this.series.get(name) ?? []; }
}
