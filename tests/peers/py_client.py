"""Drives the official Python MCP client (PyPI `mcp` 2.3.x `Client`) through toolgate for the
end-to-end tests, from a chosen loopback source address (the gateway's identity is per source IP).

    python py_client.py '{"url": "http://127.0.0.1:PORT/mcp/pydemo", "source": "127.0.0.2",
                          "steps": [{"op": "list"}, {"op": "call", "name": "echo",
                                     "arguments": {"message": "hi"}}]}'

Prints one JSON object on stdout:
    {"protocol_version": "2026-07-28" | null,
     "connect_error": null | {"type": .., "message": ..},
     "http": [{"method": "POST", "status": 200, "decision": "<Toolgate-Decision-Id>",
               "mcp_method": "<Mcp-Method header sent>"}, ...],
     "steps": [{"op": "list", "tools": [names]} |
               {"op": "call", "result": {...CallToolResult as JSON...}} |
               {"op": "call", "error": {"code": .., "message": ..}}]}
The test asserts on it; the client itself asserts nothing. Bounded: 30 s in all.
"""

import json
import sys

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


async def main(spec: dict) -> dict:
    out: dict = {"protocol_version": None, "connect_error": None, "http": [], "steps": []}

    async def on_response(response: httpx2.Response) -> None:
        out["http"].append(
            {
                "method": response.request.method,
                "status": response.status_code,
                "decision": response.headers.get("toolgate-decision-id", ""),
                "mcp_method": response.request.headers.get("mcp-method", ""),
            }
        )

    transport = httpx2.AsyncHTTPTransport(local_address=spec["source"])
    http = httpx2.AsyncClient(
        transport=transport,
        timeout=httpx2.Timeout(10.0, read=20.0),
        event_hooks={"response": [on_response]},
    )
    async with http:
        try:
            client = Client(
                streamable_http_client(spec["url"], http_client=http),
                mode=spec.get("mode", "auto"),
                read_timeout_seconds=20.0,
            )
            async with client:
                out["protocol_version"] = client.protocol_version
                for step in spec["steps"]:
                    out["steps"].append(await run_step(client, step))
        except Exception as e:  # a refused connection is a result, not a crash
            if out["connect_error"] is None and len(out["steps"]) < len(spec["steps"]):
                out["connect_error"] = {"type": type(e).__name__, "message": str(e)[:500]}
    return out


async def run_step(client: Client, step: dict) -> dict:
    op = step["op"]
    try:
        if op == "list":
            result = await client.list_tools(cache_mode="refresh")
            return {"op": op, "tools": [t.name for t in result.tools]}
        if op == "call":
            result = await client.call_tool(step["name"], step.get("arguments", {}))
            return {"op": op, "result": result.model_dump(mode="json", by_alias=True, exclude_none=True)}
    except MCPError as e:
        return {"op": op, "error": {"code": e.code, "message": e.message}}
    raise ValueError(f"unknown op {op!r}")


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])

    async def bounded() -> dict:
        with anyio.fail_after(30):
            return await main(spec)

    print(json.dumps(anyio.run(bounded)))
