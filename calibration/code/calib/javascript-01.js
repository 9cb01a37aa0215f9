'use strict';
/**
 * A tiny HTTP router on top of node:http.
 *
 * Routes are patterns like "/users/:id/orders".  Named segments are
 * collected into req.params; the query string ends up in req.query.
 */
const http = require('node:http');

class Router {
  constructor() {
    this.routes = [];
    this.middleware = [];
  }

  use(fn) {
    this.middleware.push(fn);
    return this;
  }

  add(method, pattern, handler) {
    const keys = [];
    const source = pattern
      .split('/')
      .map((part) => {
        if (part.startsWith(':')) {
          keys.push(part.slice(1));
          return '([^/]+)';
        }
        return part.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
      })
      .join('/');
    this.routes.push({ method, regex: new RegExp(`^${source}/?$`), keys, handler });
    return this;
  }

  get(p, h) { return this.add('GET', p, h); }
  post(p, h) { return this.add('POST', p, h); }
  delete(p, h) { return this.add('DELETE', p, h); }

  match(method, path) {
    let pathMatched = false;
    for (const route of this.routes) {
      const m = route.regex.exec(path);
      if (!m) continue;
      pathMatched = true;
      if (route.method !== method) continue;
      const params = {};
      route.keys.forEach((k, i) => { params[k] = decodeURIComponent(m[i + 1]); });
      return { route, params };
    }
    return { status: pathMatched ? 405 : 404 };
  }

  async handle(req, res) {
    const url = new URL(req.url, 'http://localhost');
    req.query = Object.fromEntries(url.searchParams);
    for (const fn of this.middleware) {
      const stop = await fn(req, res);
      if (stop === false || res.writableEnded) return;
    }
    const found = this.match(req.method, url.pathname);
    if (!found.route) {
      return sendJson(res, found.status, { error: http.STATUS_CODES[found.status] });
    }
    req.params = found.params;
    try {
      await found.route.handler(req, res);
    } catch (err) {
      console.error(err);
      if (!res.headersSent) sendJson(res, 500, { error: 'internal error' });
    }
  }
}

function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(text),
  });
  res.end(text);
}

// --- example application ---------------------------------------------------
const notes = new Map([[1, { id: 1, text: 'buy milk' }]]);
let nextId = 2;

const router = new Router()
  .use((req) => { console.log(new Date().toISOString(), req.method, req.url); })
  .get('/notes', (req, res) => sendJson(res, 200, [...notes.values()]))
  .get('/notes/:id', (req, res) => {
    const note = notes.get(Number(req.params.id));
    return note ? sendJson(res, 200, note) : sendJson(res, 404, { error: 'no such note' });
  })
  .post('/notes', async (req, res) => {
    let raw = '';
    for await (const chunk of req) raw += chunk;
    const note = { id: nextId++, text: String(JSON.parse(raw).text || '') };
    notes.set(note.id, note);
    sendJson(res, 201, note);
  });

if (require.main === module) {
  const port = Number(process.env.PORT) || 8080;
  http.createServer((req, res) => router.handle(req, res))
    .listen(port, () => console.log(`listening on :${port}`));
}

module.exports = { Router, sendJson };
