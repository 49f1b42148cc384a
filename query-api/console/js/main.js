// The console's shell: sign-in, the panels and their polling.
import { anonymous, claims, loadSettings, signIn, signOut, token } from './api.js';
import { h, replace } from './dom.js';
import { projections, rebuilds } from './projections.js';
import { writePath } from './writepath.js';
import { audit } from './audit.js';
import { orders, products } from './data.js';

const PANELS = {
  projections, rebuilds, 'write-path': writePath, audit, orders, products,
};
const EVERY_MS = 2000;

let current = null;
let timer = null;

function showWho() {
  const who = document.getElementById('who');
  const c = claims();
  if (!c) {
    replace(who, h('span', {}, anonymous() ? 'Without a token' : 'Not signed in'),
      anonymous() ? h('button', { type: 'button', class: 'secondary', onclick: () => { signOut(); route(); } }, 'Sign in') : null);
    return;
  }
  const roles = c.roles.length ? c.roles.join(', ') : 'no role';
  const expired = c.exp && c.exp * 1000 < Date.now() ? ' (expired)' : '';
  replace(who,
    h('span', {}, 'Signed in as ', h('strong', {}, c.sub || '?'), ` · ${roles}${expired}`),
    h('button', { type: 'button', class: 'secondary', onclick: () => { signOut(); route(); } }, 'Sign out'));
}

async function tick() {
  clearTimeout(timer);
  if (current && current.refresh && !document.hidden) {
    try {
      await current.refresh();
    } catch (e) {
      // Each panel shows its own failures; nothing escapes to the browser's console.
    }
  }
  timer = setTimeout(tick, EVERY_MS);
}

function route() {
  showWho();
  // The fragment's segments, each decoded on its own (a stream id may hold `/` or `%`).
  const segments = location.hash.slice(1).split('/').map((s) => {
    try { return decodeURIComponent(s); } catch { return s; }
  });
  const name = segments[0] || 'projections';
  const panel = PANELS[name] ?? PANELS.projections;
  document.querySelectorAll('#tabs a').forEach((a) => {
    if (a.dataset.panel === name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  });
  const signedIn = Boolean(token()) || anonymous();
  document.getElementById('sign-in').hidden = signedIn;
  const container = document.getElementById('panel');
  if (current && current.unmount) current.unmount();
  if (!signedIn) {
    // Nothing is asked of the APIs before sign-in.
    current = null;
    replace(container);
    return;
  }
  current = panel;
  const args = segments.slice(1);
  replace(container);
  panel.mount(container, args);
  tick();
}

document.getElementById('sign-in-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const field = document.getElementById('token');
  const value = field.value.trim();
  const error = document.getElementById('sign-in-error');
  if (value.split('.').length !== 3) {
    error.textContent = 'That is not a JSON Web Token (three parts separated by dots).';
    field.focus();
    return;
  }
  error.textContent = '';
  field.value = '';
  signIn(value);
  route();
  document.getElementById('main').focus();
});

document.getElementById('anonymous').addEventListener('click', () => {
  signIn('', true);
  route();
  document.getElementById('main').focus();
});

window.addEventListener('hashchange', route);
document.addEventListener('visibilitychange', () => { if (!document.hidden) tick(); });
loadSettings().finally(route);
