// Preload shim for @modelcontextprotocol/server-everything in toolgate's tests
// (`node -r tests/peers/everything-shim.cjs .../server-everything/dist/index.js streamableHttp`).
//
// 1. Loopback only. server-everything calls `app.listen(PORT)` with no host, which binds every
//    interface (reference/mcp-gateways.md §4.2). Every `listen` that names only a port (or a
//    port and the unspecified address) is rewritten to bind 127.0.0.1; any other non-loopback
//    host is refused, so the server can never be reached from outside this machine.
// 2. Execution log. When TOOLGATE_PEER_LOG names a file, every JSON-RPC `tools/call` the server
//    receives is appended to it as one line `{"name":..,"arguments":..}`, so a test can compare
//    what the upstream executed with the gateway's audit trail. The body is observed where the
//    HTTP parser pushes it into the request stream, which leaves the server's own reading of the
//    body untouched.
'use strict';

const net = require('net');
const fs = require('fs');
const http = require('http');

const LOOPBACK = '127.0.0.1';
const isPort = (x) => typeof x === 'number' || (typeof x === 'string' && /^\d+$/.test(x));
const isLoopback = (h) => h === 'localhost' || h === '::1' || /^127\./.test(String(h));

const origListen = net.Server.prototype.listen;
net.Server.prototype.listen = function listen(...args) {
  const cb = args.find((a) => typeof a === 'function');
  if (isPort(args[0])) {
    const host = typeof args[1] === 'string' ? args[1] : undefined;
    if (host !== undefined && host !== '' && host !== '0.0.0.0' && host !== '::' && !isLoopback(host)) {
      throw new Error(`everything-shim: refusing to listen on ${host} (loopback only)`);
    }
    return origListen.call(this, { port: Number(args[0]), host: LOOPBACK }, cb);
  }
  if (args[0] && typeof args[0] === 'object' && !Array.isArray(args[0]) && args[0].path === undefined &&
      args[0].fd === undefined && args[0].handle === undefined && args[0]._handle === undefined) {
    const opts = { ...args[0] };
    if (opts.host === undefined || opts.host === '' || opts.host === '0.0.0.0' || opts.host === '::') {
      opts.host = LOOPBACK;
    } else if (!isLoopback(opts.host)) {
      throw new Error(`everything-shim: refusing to listen on ${opts.host} (loopback only)`);
    }
    return origListen.call(this, opts, cb);
  }
  return origListen.apply(this, args);
};

const logFile = process.env.TOOLGATE_PEER_LOG;
if (logFile) {
  const record = (body) => {
    let msgs;
    try {
      msgs = JSON.parse(body);
    } catch {
      return;
    }
    for (const m of Array.isArray(msgs) ? msgs : [msgs]) {
      if (m && m.method === 'tools/call' && m.params && typeof m.params.name === 'string') {
        const line = JSON.stringify({ name: m.params.name, arguments: m.params.arguments ?? {} });
        fs.appendFileSync(logFile, line + '\n');
      }
    }
  };
  const origPush = http.IncomingMessage.prototype.push;
  http.IncomingMessage.prototype.push = function push(chunk, encoding) {
    if (this.method === 'POST') {
      if (chunk === null) {
        if (this.__toolgateBody) {
          record(Buffer.concat(this.__toolgateBody).toString('utf8'));
          this.__toolgateBody = undefined;
        }
      } else if (chunk !== undefined) {
        (this.__toolgateBody ||= []).push(Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk, encoding));
      }
    }
    return origPush.call(this, chunk, encoding);
  };
}
