// Building the page: every text from the APIs goes in as a text node, never as markup,
// because event payloads are written by clients.

/** An element: `attrs` set as attributes (`on*` functions as listeners), `children` appended
 *  (strings and numbers as text nodes; null and false skipped; arrays flattened). */
export function h(tag, attrs = {}, ...children) {
  const svg = ['svg', 'polyline', 'line', 'text', 'rect', 'g', 'title', 'path', 'circle'].includes(tag);
  const el = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      el.addEventListener(name.slice(2), value);
    } else if (name === 'dataset') {
      Object.assign(el.dataset, value);
    } else {
      el.setAttribute(name, value === true ? '' : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** Replaces `el`'s children. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A table: `columns` as [heading, cell(row), class?]; `rows` the data. */
export function table(caption, columns, rows, empty = 'Nothing to show.') {
  if (!rows.length) return h('p', { class: 'muted' }, empty);
  // A table wider than its column scrolls sideways: its wrapper takes the focus, so the
  // keyboard scrolls it too, and names itself for screen readers.
  const name = caption ?? `Table of ${columns.map(([title]) => title).join(', ')}`;
  return h('div', { class: 'table-wrap', tabindex: 0, role: 'region', 'aria-label': name },
    h('table', {},
      caption ? h('caption', {}, caption) : null,
      h('thead', {}, h('tr', {}, columns.map(([title, , cls]) => h('th', { scope: 'col', class: cls }, title)))),
      h('tbody', {}, rows.map((row) => h('tr', {}, columns.map(([, cell, cls]) => h('td', { class: cls }, cell(row))))))));
}

/** A list of figures: [label, value] pairs. */
export function stats(pairs) {
  return h('dl', { class: 'stats' }, pairs.map(([label, value]) => h('div', {}, h('dt', {}, label), h('dd', {}, value))));
}

export function badge(text, kind) {
  return h('span', { class: `badge ${kind}` }, text);
}

const numbers = new Intl.NumberFormat('en');
export function num(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return '–';
  return numbers.format(Number(n.toFixed(digits)));
}

export function seconds(s) {
  if (s === null || s === undefined) return '–';
  if (s < 60) return `${num(s, s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

export function time(iso) {
  if (!iso) return '–';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

export function money(m) {
  if (!m || typeof m !== 'object') return '–';
  return `${(Number(m.amount_minor) / 100).toFixed(2)} ${m.currency ?? ''}`;
}

/** A problem document (or any failure) as a sentence. */
export function describe(error) {
  if (error && error.problem && typeof error.problem === 'object') {
    return `${error.status} ${error.problem.title ?? ''}: ${error.problem.detail ?? ''}`.trim();
  }
  return String(error && error.message ? error.message : error);
}
