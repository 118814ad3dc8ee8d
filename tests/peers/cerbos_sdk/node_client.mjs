// The npm `@cerbos/http` client against one Cerbos-compatible server: runs a fixed scenario and
// prints what the client returned as JSON, so the test can compare toolgate with Cerbos.
// usage: node node_client.mjs BASE_URL TOKEN   (NODE_PATH points at the installed modules)
import { createRequire } from "node:module";
const require = createRequire(process.env.NODE_PATH + "/");
const { HTTP } = require("@cerbos/http");

const [base, token] = process.argv.slice(2);
const c = new HTTP(base);
const out = {};
out.health = await c.checkHealth();
const info = await c.serverInfo();
out.serverInfo = { hasVersion: typeof info.version === "string" && info.version.length > 0 };
const alice = { id: "alice", roles: ["user"], attr: { team: "core", org: "example" } };
const sre = { id: "sam", roles: ["user", "sre"], attr: { team: "ops", org: "example" } };
const resources = [
  { resource: { kind: "mcp_tool", id: "read_file", attr: { org: "example", team: "core", owner: "bob", arguments: { path: "/src/a" } } },
    actions: ["tools/call::read_file", "tools/call::write_file", "tools/call::delete_x", "tools/list::read_file"] },
  { resource: { kind: "mcp_tool", id: "create_issue", attr: { org: "example", team: "core", owner: "bob", arguments: { lines: 800 } } },
    actions: ["tools/call::create_issue"] },
  { resource: { kind: "mcp_tool", id: "deploy", attr: { org: "example", env: "prod", arguments: { change_ticket: "CHG-42" } } },
    actions: ["tools/call::deploy"] },
  { resource: { kind: "mcp_tool", id: "write_file", scope: "acme", attr: { org: "example", team: "core", arguments: { ticket: "" } } },
    actions: ["tools/call::write_file", "tools/call::read_file"] },
];
const plain = (r) => ({
  resource: r.resource,
  actions: r.actions,
  outputs: r.outputs,
  validationErrors: r.validationErrors,
  metadata: r.metadata,
});
for (const [name, principal] of [["alice", alice], ["sre", sre]]) {
  const r = await c.checkResources({ principal, resources, includeMetadata: true, requestId: "js-" + name });
  out["check_" + name] = { requestId: r.requestId, results: r.results.map(plain) };
}
const r = await c.checkResources({
  principal: alice,
  resources: [{ resource: { kind: "mcp_tool", id: "read_file", scope: "acme", attr: { org: "other" } }, actions: ["tools/call::read_file"] }],
  auxData: { jwt: { token } },
  includeMetadata: true,
});
out.check_jwt = r.results.map(plain);
out.isAllowed = [
  await c.isAllowed({ principal: alice, resource: { kind: "mcp_tool", id: "search_code", attr: { org: "example" } }, action: "tools/call::search_code" }),
  await c.isAllowed({ principal: sre, resource: { kind: "mcp_tool", id: "deploy", attr: { org: "example", env: "staging" } }, action: "tools/call::deploy" }),
  await c.isAllowed({ principal: alice, resource: { kind: "mcp_tool", id: "delete_repo", attr: {} }, action: "tools/call::delete_repo" }),
];
// Query plans (document.yaml): each filter kind, each operator family, multi-role principals.
const aliceDoc = { id: "alice", roles: ["user"], attr: { team: "red", regions: ["eu", "us"], max_size: 100, until: 2025 } };
const bobDoc = { id: "bob", roles: ["contractor"], attr: { team: "blue", regions: ["eu"] } };
const mixed = { id: "dan", roles: ["auditor", "contractor"], attr: { team: "blue", regions: ["eu"], until: 2024 } };
const doc = { kind: "document" };
const plans = [
  ["list", aliceDoc, doc], ["purge", aliceDoc, doc], ["view", aliceDoc, doc], ["edit", aliceDoc, doc],
  ["archive", aliceDoc, doc], [["view", "edit"], aliceDoc, doc], ["view", bobDoc, doc],
  ["view", mixed, doc], ["view", mixed, { kind: "document", attr: { visibility: "public" } }],
  ["edit", { id: "root", roles: ["admin"] }, doc], ["view", aliceDoc, { kind: "no_such_kind" }],
];
out.plans = [];
for (const [i, [actions, principal, resource]] of plans.entries()) {
  const r = await c.planResources({
    principal, resource, includeMetadata: true, requestId: "js-plan-" + i,
    ...(Array.isArray(actions) ? { actions } : { action: actions }),
  });
  delete r.cerbosCallId;
  out.plans.push(r);
}
try {
  await c.checkResources({ principal: { id: "x", roles: [] }, resources });
  out.invalid = { thrown: false };
} catch (e) {
  out.invalid = { thrown: true, name: e.constructor.name, code: e.code, message: e.details ?? e.message };
}
process.stdout.write(JSON.stringify(out) + "\n");
