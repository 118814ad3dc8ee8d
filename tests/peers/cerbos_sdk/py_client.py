"""The PyPI `cerbos` SDK against one Cerbos-compatible server: runs a fixed scenario and prints
what the SDK returned as JSON, so the test can compare toolgate's answers with Cerbos's.

usage: py_client.py BASE_URL TOKEN
"""
import json
import sys

from cerbos.sdk.client import CerbosClient
from cerbos.sdk.model import (
    JWT, AuxData, Principal, Resource, ResourceAction, ResourceDesc, ResourceList,
)

base, token = sys.argv[1], sys.argv[2]
out = {}


def result_json(r):
    return {
        "resource": {"id": r.resource.id, "kind": r.resource.kind},
        "actions": {a: e.value for a, e in sorted(r.actions.items())},
        "outputs": [{"src": o.src, "val": o.val, "action": o.action} for o in (r.outputs or [])],
        "validation_errors": [str(v) for v in (r.validation_errors or [])],
    }


with CerbosClient(base, raise_on_error=False, timeout_secs=10) as c:
    out["healthy"] = c.is_healthy()
    alice = Principal("alice", roles={"user"}, attr={"team": "core", "org": "example"})
    sre = Principal("sam", roles={"user", "sre"}, attr={"team": "ops", "org": "example"})
    resources = ResourceList(resources=[
        ResourceAction(
            Resource("read_file", "mcp_tool", attr={"org": "example", "team": "core", "owner": "bob", "arguments": {"path": "/src/a"}}),
            actions={"tools/call::read_file", "tools/call::write_file", "tools/call::delete_x", "tools/list::read_file"},
        ),
        ResourceAction(
            Resource("create_issue", "mcp_tool", attr={"org": "example", "team": "core", "owner": "bob", "arguments": {"lines": 800}}),
            actions={"tools/call::create_issue"},
        ),
        ResourceAction(
            Resource("deploy", "mcp_tool", attr={"org": "example", "env": "prod", "arguments": {"change_ticket": "CHG-42"}}),
            actions={"tools/call::deploy"},
        ),
    ])
    for name, p in (("alice", alice), ("sre", sre)):
        r = c.check_resources(p, resources, request_id="py-" + name)
        out["check_" + name] = {
            "request_id": r.request_id,
            "results": [result_json(x) for x in r.results],
        }
    aux = AuxData(jwt=JWT(token))
    r = c.check_resources(
        alice,
        ResourceList(resources=[ResourceAction(Resource("read_file", "mcp_tool", scope="acme", attr={"org": "other"}), actions={"tools/call::read_file", "tools/call::write_file"})]),
        request_id="py-jwt",
        aux_data=aux,
    )
    out["check_jwt"] = [result_json(x) for x in r.results] if r.results is not None else {"error": str(r.status_msg)}
    out["is_allowed"] = [
        c.is_allowed("tools/call::search_code", alice, Resource("search_code", "mcp_tool", attr={"org": "example"})),
        c.is_allowed("tools/call::deploy", sre, Resource("deploy", "mcp_tool", attr={"org": "example", "env": "staging"})),
        c.is_allowed("tools/call::delete_repo", alice, Resource("delete_repo", "mcp_tool", attr={})),
    ]
    # Query plans (document.yaml): always allowed, always denied, and conditional with each
    # operator family; single-role principals, as the SDK sends roles from a set.
    doc = ResourceDesc("document")
    alice_doc = Principal("alice", roles={"user"}, attr={"team": "red", "regions": ["eu", "us"], "max_size": 100, "until": 2025})
    bob_doc = Principal("bob", roles={"contractor"}, attr={"team": "blue", "regions": ["eu"]})
    audit_doc = Principal("carol", roles={"auditor"}, attr={"until": 2024})
    plans = [
        ("list", alice_doc, doc),
        ("purge", alice_doc, doc),
        ("view", alice_doc, doc),
        ("edit", alice_doc, doc),
        ("archive", alice_doc, doc),
        (["view", "edit"], alice_doc, doc),
        ("view", bob_doc, doc),
        ("view", bob_doc, ResourceDesc("document", attr={"visibility": "public"})),
        ("audit", audit_doc, doc),
        ("view", alice_doc, ResourceDesc("no_such_kind")),
    ]
    out["plans"] = []
    for i, (actions, who, res) in enumerate(plans):
        r = c.plan_resources(actions, who, res, request_id="py-plan-%d" % i)
        d = r.to_dict()
        d.pop("status_msg", None)
        out["plans"].append(d)
    # The SDK's own handling of an invalid request: empty roles.
    bad = c.check_resources(Principal("x", roles=set()), resources)
    out["invalid"] = {
        "status_code": bad.status_code,
        "code": bad.status_msg.code,
        "message": bad.status_msg.message,
        "results": bad.results,
    }

print(json.dumps(out, sort_keys=True))
