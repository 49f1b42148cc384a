// Calls to the two public APIs, with the bearer token this tab signed in with.

const TOKEN = 'keel.console.token';
const ANONYMOUS = 'keel.console.anonymous';

export class ApiError extends Error {
  constructor(status, problem) {
    super(typeof problem === 'object' && problem ? problem.detail ?? problem.title : String(problem));
    this.status = status;
    this.problem = problem;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN);
}

/** Keeps `value` as this tab's token; with `withoutToken`, calls go without one (for APIs
 *  whose authentication is off). */
export function signIn(value, withoutToken = false) {
  if (withoutToken) {
    sessionStorage.removeItem(TOKEN);
    sessionStorage.setItem(ANONYMOUS, '1');
  } else {
    sessionStorage.removeItem(ANONYMOUS);
    sessionStorage.setItem(TOKEN, value.trim());
  }
}

export function signOut() {
  sessionStorage.removeItem(TOKEN);
  sessionStorage.removeItem(ANONYMOUS);
}

export function anonymous() {
  return sessionStorage.getItem(ANONYMOUS) === '1';
}

/** The token's claims (not verified here: the APIs verify it), or null. */
export function claims() {
  const t = token();
  if (!t) return null;
  try {
    const part = t.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const json = atob(part + '='.repeat((4 - (part.length % 4)) % 4));
    const c = JSON.parse(new TextDecoder().decode(Uint8Array.from(json, (ch) => ch.charCodeAt(0))));
    return { sub: String(c.sub ?? ''), roles: Array.isArray(c.roles) ? c.roles.map(String) : [], exp: c.exp };
  } catch {
    return { sub: '', roles: [], exp: undefined, unreadable: true };
  }
}

/** Whether the token says it holds `role` (with no token, the APIs decide: authentication
 *  may be off). */
export function holds(role) {
  const c = claims();
  return !c || c.unreadable || c.roles.includes(role);
}

let settings = { command_api: null };

export async function loadSettings() {
  const r = await fetch('/console/settings.json');
  if (r.ok) settings = await r.json();
  return settings;
}

export function commandApi() {
  return settings.command_api;
}

/** Calls `url` (a path of the query API, or a full URL): the parsed body, the headers and
 *  the status; an `ApiError` with the problem document when the answer is not 2xx. */
export async function call(url, { method = 'GET', body } = {}) {
  const headers = { accept: 'application/json, application/problem+json, text/plain' };
  const t = token();
  if (t) headers.authorization = `Bearer ${t}`;
  const init = { method, headers };
  if (body !== undefined) {
    headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (e) {
    throw new ApiError(0, { title: 'Unreachable', detail: `${url} did not answer (${e.message})` });
  }
  const type = response.headers.get('content-type') || '';
  const data = type.includes('json') ? await response.json() : await response.text();
  if (!response.ok) throw new ApiError(response.status, data);
  return { data, headers: response.headers, status: response.status };
}

/** A path with its query string from `params` (empty values left out). */
export function withQuery(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') q.set(k, v);
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

/** Follows a request the admin routes recorded (at `location`) until it is done or failed,
 *  calling `update` with each state; the last state. */
export async function follow(location, update, every = 500) {
  for (;;) {
    const { data } = await call(location);
    update(data);
    if (data.state === 'done' || data.state === 'failed') return data;
    await new Promise((r) => setTimeout(r, every));
  }
}
