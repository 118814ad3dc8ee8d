"""A small stdio MCP server for toolgate's supervision tests: the plain protocol (initialize,
tools/list, tools/call, ping) on stdin/stdout, plus the misbehaviours the tests need.

    python3 stdio_fixture.py MODE [PIDFILE]

MODE (comma-separated):
  echo         answer every call with its arguments (the default behaviour)
  crash        exit with status 3 when a tool named `crash` is called (no answer)
  hang         never answer a tool named `hang`
  garbage      write a line that is not JSON when a tool named `garbage` is called
  flood        write 20000 lines to stderr before answering each call
  fork         at start, leave two grandchildren running (`sleep`): one in our process group
               and one in a new session (setsid); their pids go to PIDFILE with ours (to
               PIDFILE/<our pid> when PIDFILE is a directory)
  ignore-term  ignore SIGTERM (only SIGKILL stops it)
  pages        tools/list, prompts/list and resources/list answer 3 pages of 2 items each
  notify       after every call, send notifications/tools/list_changed
  cancels      the tool `echo` answers, instead of its arguments, with the request ids of the
               `hang` calls and of the notifications/cancelled received so far:
               {"hung": [...], "cancelled": [...]}

The tool `ask` always sends a `sampling/createMessage` request to the client mid-call and
answers with what came back (or the error).

Only the standard library; nothing touches the network or the disk except PIDFILE.
"""

import json
import os
import signal
import subprocess
import sys

MODES = set(sys.argv[1].split(",")) if len(sys.argv) > 1 else {"echo"}
PIDFILE = sys.argv[2] if len(sys.argv) > 2 else None
NAME = os.environ.get("FIXTURE_NAME", "fixture")

if "ignore-term" in MODES:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

if "fork" in MODES:
    same_group = subprocess.Popen(["sleep", "1000"])
    new_session = subprocess.Popen(["sleep", "1001"], start_new_session=True)
    if PIDFILE:
        path = os.path.join(PIDFILE, str(os.getpid())) if os.path.isdir(PIDFILE) else PIDFILE
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {same_group.pid} {new_session.pid}\n")


HUNG = []
CANCELLED = []


def send(msg):
    sys.stdout.write(json.dumps(msg, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def page(kind, cursor):
    n = int(cursor) if cursor else 0
    items = []
    for i in range(2):
        k = n * 2 + i
        if kind == "tools":
            items.append({"name": f"{NAME}_tool_{k}", "inputSchema": {"type": "object"}})
        elif kind == "prompts":
            items.append({"name": f"{NAME}_prompt_{k}"})
        else:
            items.append({"uri": f"fixture://{NAME}/{k}", "name": f"r{k}"})
    result = {kind: items}
    if n < 2:
        result["nextCursor"] = str(n + 1)
    return result


def answer(req):
    method = req.get("method")
    params = req.get("params") or {}
    if method == "initialize":
        return {
            "protocolVersion": params.get("protocolVersion", "2025-11-25"),
            "capabilities": {"tools": {"listChanged": True}, "prompts": {}, "resources": {}},
            "serverInfo": {"name": NAME, "version": "1"},
        }
    if method == "ping":
        return {}
    if method in ("tools/list", "prompts/list", "resources/list"):
        kind = method.split("/")[0]
        if "pages" in MODES:
            return page(kind, params.get("cursor"))
        if kind == "tools":
            return {"tools": [
                {"name": n, "inputSchema": {"type": "object"}}
                for n in ("echo", "crash", "hang", "garbage", "get_sum", "ask", "secret")
            ]}
        return {kind: []}
    if method == "resources/read":
        return {"contents": [{"uri": params.get("uri"), "text": f"{NAME} says hi"}]}
    if method == "prompts/get":
        return {"messages": [{"role": "user",
                              "content": {"type": "text", "text": f"{NAME}: {params.get('name')}"}}]}
    if method == "tools/call":
        name = params.get("name")
        args = params.get("arguments") or {}
        if "flood" in MODES:
            for i in range(20000):
                sys.stderr.write(f"flood line {i} " + "x" * 100 + "\n")
            sys.stderr.flush()
        if name == "crash" and "crash" in MODES:
            os._exit(3)
        if name == "hang" and "hang" in MODES:
            HUNG.append(req.get("id"))
            return None
        if name == "garbage" and "garbage" in MODES:
            sys.stdout.write("this is not JSON-RPC\n")
            sys.stdout.flush()
            return None
        if name == "ask":
            # A server request in the middle of a call: the answer comes back on stdin.
            send({"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage",
                  "params": {"messages": [{"role": "user",
                                           "content": {"type": "text", "text": "hi"}}],
                             "maxTokens": 5}})
            while True:
                line = sys.stdin.readline()
                if not line:
                    os._exit(0)
                m = json.loads(line)
                if m.get("id") == "s1" and "method" not in m:
                    break
            if "error" in m:
                text = "sampling refused: " + m["error"]["message"]
            else:
                text = "sampled: " + m["result"]["content"]["text"]
            return {"content": [{"type": "text", "text": text}], "isError": False}
        if name == "echo" and "cancels" in MODES:
            text = json.dumps({"hung": HUNG, "cancelled": CANCELLED})
            return {"content": [{"type": "text", "text": text}], "isError": False}
        if name == "get_sum":
            text = str(args.get("a", 0) + args.get("b", 0))
        else:
            text = json.dumps(args, sort_keys=True)
        return {"content": [{"type": "text", "text": text}], "isError": False}
    return {"__error__": {"code": -32601, "message": f"Method not found: {method}"}}


while True:
    line = sys.stdin.readline()
    if not line:
        break
    line = line.strip()
    if not line:
        continue
    req = json.loads(line)
    if req.get("method") == "notifications/cancelled":
        CANCELLED.append((req.get("params") or {}).get("requestId"))
    if "method" not in req or "id" not in req:
        continue  # notifications and answers to our own requests
    result = answer(req)
    if result is None:
        continue
    if "__error__" in result:
        send({"jsonrpc": "2.0", "id": req["id"], "error": result["__error__"]})
    else:
        send({"jsonrpc": "2.0", "id": req["id"], "result": result})
    if "notify" in MODES and req.get("method") == "tools/call":
        send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
