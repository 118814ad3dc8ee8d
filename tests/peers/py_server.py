"""A real Python MCP server (PyPI `mcp` 2.3.x `MCPServer`, Streamable HTTP, protocol 2026-07-28
with the handshake-era fallback) for toolgate's end-to-end tests.

    python py_server.py PORT [LOG]
    python py_server.py stdio [LOG]

Binds 127.0.0.1:PORT only (or speaks MCP on stdin/stdout: `stdio`, behind toolgate as a stdio
server). Every tool it executes is appended to LOG (one JSON line
`{"name": .., "arguments": ..}`), so a test can compare what ran with the gateway's audit trail;
a `slow` call cancelled before it answers is logged as `slow:cancelled`.
Nothing here touches the real world.
"""

import json
import os
import sys

import anyio

from mcp.server.mcpserver import MCPServer

STDIO = sys.argv[1] == "stdio"
PORT = 0 if STDIO else int(sys.argv[1])
LOG = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("TOOLGATE_PEER_LOG")

app = MCPServer("toolgate-peer-python")


def executed(name: str, arguments: dict) -> None:
    if LOG:
        with open(LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "arguments": arguments}, sort_keys=True) + "\n")


@app.tool()
def echo(message: str) -> str:
    """Echo a message back."""
    executed("echo", {"message": message})
    return f"Echo: {message}"


@app.tool()
def get_sum(a: int, b: int) -> str:
    """Add two integers."""
    executed("get_sum", {"a": a, "b": b})
    return f"The sum of {a} and {b} is {a + b}."


@app.tool()
def write_file(path: str, content: str) -> str:
    """Pretend to write a file (nothing is written)."""
    executed("write_file", {"path": path, "content": content})
    return f"would write {len(content)} bytes to {path}"


@app.tool()
def read_env() -> str:
    """Would return the server's environment: a realistic target for a deny."""
    executed("read_env", {})
    return "SECRET=never-shown"


@app.tool()
async def slow(seconds: float) -> str:
    """Answer after `seconds`; a call cancelled first is logged as `slow:cancelled`."""
    executed("slow", {"seconds": seconds})
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        executed("slow:cancelled", {"seconds": seconds})
        raise
    return f"waited {seconds} s"


if __name__ == "__main__":
    if STDIO:
        app.run("stdio")
    else:
        app.run("streamable-http", host="127.0.0.1", port=PORT)
