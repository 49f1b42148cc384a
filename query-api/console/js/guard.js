// What a panel shows when the token cannot use it.
import { claims, holds } from './api.js';
import { h, replace } from './dom.js';

/** Null when the token holds `role`; else a polite refusal naming the role. */
export function refusal(role, what) {
  if (holds(role)) return null;
  const c = claims();
  const has = c && c.roles.length ? c.roles.join(', ') : 'no role';
  return h('div', { class: 'refused', role: 'status' },
    h('h2', {}, `${what} needs the ${role} role`),
    h('p', {}, `This token (subject ${c ? c.sub : '?'}) holds ${has}. Sign in with a token that holds `,
      h('code', {}, role), ' to use this panel; nothing was asked of the APIs.'));
}

/** The sentence for an API's 401 or 403. */
export function refusedBy(error, role) {
  if (error.status === 401) return 'The API did not accept this token (missing, expired or not trusted): sign in again.';
  if (error.status === 403) return `The API refused this token: it needs the ${role} role.`;
  return null;
}

/** Mounts a panel titled `title` that needs `role` into `container`: `panel.body` to fill
 *  (saying "Loading…" until then) and `panel.active`, or the refusal in its place. */
export function mountGuarded(panel, container, role, title) {
  const refused = refusal(role, `The ${title.toLowerCase()} panel`);
  panel.body = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  replace(container, h('h2', {}, title), refused ?? panel.body);
  panel.active = !refused;
}
