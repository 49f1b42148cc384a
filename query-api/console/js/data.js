// Orders and products, read-only, from the query API's views with their pagination
// (limit and next_cursor); an order opens its audit timeline.
import { call, withQuery } from './api.js';
import { badge, describe, h, num, replace, table, time } from './dom.js';
import { refusal, refusedBy } from './guard.js';

const minor = (amount, currency) => `${(Number(amount) / 100).toFixed(2)} ${currency}`;

function listPanel({ title, path, statuses, columns, empty }) {
  return {
    mount(container) {
      const refused = refusal('queries:read', `The ${title.toLowerCase()} panel`);
      this.cursors = [];
      this.status = '';
      this.body = h('div', {});
      const id = `${path.replace(/\W/g, '-')}-status`;
      const select = h('select', { id }, h('option', { value: '' }, 'any'), statuses.map((s) => h('option', { value: s }, s)));
      select.addEventListener('change', () => { this.status = select.value; this.cursors = []; this.load(); });
      replace(container, h('h2', {}, title), refused ?? [
        h('div', { class: 'row' }, h('div', {}, h('label', { for: id }, 'Status'), select)),
        this.body]);
      if (!refused) this.load();
    },
    async load() {
      try {
        const cursor = this.cursors[this.cursors.length - 1];
        const { data } = await call(withQuery(path, { status: this.status, limit: 25, cursor }));
        replace(this.body,
          table(`${title}, page ${this.cursors.length + 1}`, columns, data.items, empty),
          h('div', { class: 'actions' },
            this.cursors.length ? h('button', { type: 'button', class: 'secondary', onclick: () => { this.cursors.pop(); this.load(); } }, 'Previous page') : null,
            data.next_cursor ? h('button', { type: 'button', class: 'secondary', onclick: () => { this.cursors.push(data.next_cursor); this.load(); } }, 'Next page') : null));
      } catch (e) {
        replace(this.body, h('p', { class: 'error', role: 'alert' }, refusedBy(e, 'queries:read') ?? describe(e)));
      }
    },
  };
}

export const orders = listPanel({
  title: 'Orders',
  path: '/v1/orders',
  statuses: ['placed', 'paid', 'shipped', 'cancelled'],
  empty: 'No order yet.',
  columns: [
    ['Order', (o) => h('a', { href: `#audit/order/${encodeURIComponent(o.order_id)}`, title: 'open its audit timeline' }, o.order_id)],
    ['Customer', (o) => o.customer_id],
    ['Status', (o) => badge(o.status, o.status === 'cancelled' ? 'bad' : 'ok')],
    ['Total', (o) => minor(o.total_minor, o.currency), 'num'],
    ['Paid', (o) => minor(o.paid_minor, o.currency), 'num hide-narrow'],
    ['Items', (o) => num(o.item_count), 'num hide-narrow'],
    ['Placed', (o) => time(o.placed_at), 'hide-narrow'],
  ],
});

export const products = listPanel({
  title: 'Products',
  path: '/v1/products',
  statuses: ['active', 'discontinued'],
  empty: 'No product yet.',
  columns: [
    ['SKU', (p) => h('a', { href: `#audit/product/${encodeURIComponent(p.sku)}`, title: 'open its audit timeline' }, p.sku)],
    ['Name', (p) => p.name],
    ['Price', (p) => minor(p.price_minor, p.currency), 'num'],
    ['On hand', (p) => num(p.on_hand), 'num'],
    ['Reserved', (p) => num(p.reserved), 'num hide-narrow'],
    ['Status', (p) => badge(p.status, p.status === 'active' ? 'ok' : 'warn')],
  ],
});
