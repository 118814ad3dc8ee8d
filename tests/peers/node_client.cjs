// Drives the official TypeScript MCP client (npm @modelcontextprotocol/sdk 1.32.x: `Client` +
// `StreamableHTTPClientTransport`, protocol 2025-11-25 with sessions) through toolgate for the
// end-to-end tests, from a chosen loopback source address (the gateway's identity is per
// source IP).
//
//   TOOLGATE_MCP_NODE_MODULES=.../node_modules node node_client.cjs '{"url": "http://127.0.0.1:PORT/mcp/everything",
//       "source": "127.0.0.2", "steps": [{"op": "list"}, {"op": "call", "name": "echo", "arguments": {"message": "hi"}}]}'
//
// Prints one JSON object on stdout:
//   {"protocol_version": "2025-11-25" | null, "session_id": "..." | null,
//    "connect_error": null | {"type", "message", "code"},
//    "http": [{"method", "status", "decision", "mcp_method"}],
//    "steps": [{"op": "list", "tools": [names]} | {"op": "call", "result": {...}} |
//              {"op": "call", "error": {"code", "message"}} | {"op": "terminate", "ok": true}]}
// The test asserts on it; this driver asserts nothing. Bounded: 30 s in all.
'use strict';

const http = require('http');
const path = require('path');
const { Readable } = require('stream');
const { createRequire } = require('module');

const nodeModules = process.env.TOOLGATE_MCP_NODE_MODULES;
if (!nodeModules) {
  console.error('TOOLGATE_MCP_NODE_MODULES is not set');
  process.exit(2);
}
const req = createRequire(path.join(nodeModules, 'toolgate-peers.js'));
const { Client } = req('@modelcontextprotocol/sdk/client/index.js');
const { StreamableHTTPClientTransport } = req('@modelcontextprotocol/sdk/client/streamableHttp.js');

const spec = JSON.parse(process.argv[2]);
const out = { protocol_version: null, session_id: null, connect_error: null, http: [], steps: [] };
const agent = new http.Agent({ keepAlive: true });

// A fetch over node:http that binds the source address (the global fetch cannot). Only http:
// URLs on loopback are accepted.
function boundFetch(url, init = {}) {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    if (u.protocol !== 'http:' || !/^127\./.test(u.hostname)) {
      reject(new Error(`refusing non-loopback URL ${u}`));
      return;
    }
    const headers = {};
    new Headers(init.headers || {}).forEach((v, k) => {
      headers[k] = v;
    });
    const method = init.method || 'GET';
    const r = http.request(
      { host: u.hostname, port: u.port, path: u.pathname + u.search, method, headers, agent, localAddress: spec.source },
      (res) => {
        out.http.push({
          method,
          status: res.statusCode,
          decision: res.headers['toolgate-decision-id'] || '',
          mcp_method: headers['mcp-method'] || '',
        });
        const h = new Headers();
        for (const [k, v] of Object.entries(res.headers)) {
          if (Array.isArray(v)) v.forEach((x) => h.append(k, x));
          else if (v !== undefined) h.set(k, String(v));
        }
        const empty = res.statusCode === 204 || res.statusCode === 304 || method === 'HEAD';
        if (empty) res.resume();
        resolve(new Response(empty ? null : Readable.toWeb(res), { status: res.statusCode, statusText: res.statusMessage, headers: h }));
      },
    );
    r.on('error', reject);
    if (init.signal) {
      if (init.signal.aborted) r.destroy(new Error('aborted'));
      else init.signal.addEventListener('abort', () => r.destroy(new Error('aborted')), { once: true });
    }
    if (init.body !== undefined && init.body !== null) r.end(typeof init.body === 'string' ? init.body : Buffer.from(init.body));
    else r.end();
  });
}

async function runStep(client, transport, step) {
  try {
    switch (step.op) {
      case 'list': {
        const res = await client.listTools();
        return { op: 'list', tools: res.tools.map((t) => t.name) };
      }
      case 'call': {
        const res = await client.callTool({ name: step.name, arguments: step.arguments || {} });
        return { op: 'call', result: res };
      }
      case 'terminate': {
        await transport.terminateSession();
        return { op: 'terminate', ok: true };
      }
      default:
        throw new Error(`unknown op ${step.op}`);
    }
  } catch (e) {
    if (typeof e.code === 'number') {
      // McpError's message is "MCP error <code>: <message>"; keep the server's own words.
      const m = String(e.message).replace(/^MCP error -?\d+: /, '');
      return { op: step.op, error: { code: e.code, message: m } };
    }
    throw e;
  }
}

async function main() {
  const transport = new StreamableHTTPClientTransport(new URL(spec.url), { fetch: boundFetch });
  const client = new Client({ name: 'toolgate-e2e-node', version: '1.0.0' }, { capabilities: {} });
  try {
    await client.connect(transport);
    out.protocol_version = transport.protocolVersion || null;
    out.session_id = transport.sessionId || null;
    for (const step of spec.steps) {
      out.steps.push(await runStep(client, transport, step));
    }
  } catch (e) {
    out.connect_error = { type: e.constructor ? e.constructor.name : 'Error', message: String(e.message).slice(0, 500), code: e.code ?? null };
  }
  try {
    await client.close();
  } catch {
    // closing is best effort
  }
  agent.destroy();
}

const timer = setTimeout(() => {
  out.connect_error = out.connect_error || { type: 'Timeout', message: 'node client timed out after 30 s' };
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(3);
}, 30000);

main().then(() => {
  clearTimeout(timer);
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(0);
});
