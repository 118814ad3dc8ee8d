// A tiny MCP upstream (Streamable HTTP, JSON answers) built only on Go's standard library,
// for toolgate's key-smuggling tests (tests/mcp_peers.rs). Its point is the decoder:
// encoding/json matches object keys to struct fields case-insensitively, with Unicode folding
// (`paramſ` fills Params, `K` matches k), and the last of two matching keys wins. That is how
// real Go MCP servers read requests, so whatever this server executes is what such a server
// would execute.
//
// Every tool call, prompt, resource read, completion, notification and client answer it
// acts on is appended to the -log file as one JSON line, with the arguments as Go decoded
// them: {"kind":"call","tool":"get_issue","arguments":{...}}.
//
//	go-mcp-peer -listen 127.0.0.1:0 -log executed.jsonl   serve; prints "listening ADDR" first
//	go-mcp-peer -folds                                      print the rune pairs this Go's
//	                                                        encoding/json treats as one letter
//
// Loopback only: -listen must be a 127.0.0.0/8 address.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"unicode"
	"unicode/utf8"
)

type message struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Method  string          `json:"method"`
	Params  json.RawMessage `json:"params"`
	Result  json.RawMessage `json:"result"`
	Error   json.RawMessage `json:"error"`
}

type callParams struct {
	Name      string          `json:"name"`
	Arguments json.RawMessage `json:"arguments"`
	Task      json.RawMessage `json:"task"`
}

// The tools' typed arguments: decoded the way a Go server decodes them.
type issueArgs struct {
	Owner  string `json:"owner"`
	Repo   string `json:"repo"`
	Number int    `json:"number"`
}

type visibilityArgs struct {
	Repo       string `json:"repo"`
	Visibility string `json:"visibility"`
	KeepForks  bool   `json:"keep_forks"`
}

type recorder struct {
	mu  sync.Mutex
	out *os.File
}

func (r *recorder) record(entry map[string]any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	line, err := json.Marshal(entry)
	if err != nil {
		log.Printf("record: %v", err)
		return
	}
	if _, err := r.out.Write(append(line, '\n')); err != nil {
		log.Printf("record: %v", err)
	}
}

var tools = []map[string]any{
	{"name": "get_issue", "description": "Read an issue", "inputSchema": map[string]any{
		"type": "object", "properties": map[string]any{
			"owner": map[string]any{"type": "string"}, "repo": map[string]any{"type": "string"},
			"number": map[string]any{"type": "integer"}}}},
	{"name": "delete_repository", "description": "Delete a repository", "inputSchema": map[string]any{
		"type": "object", "properties": map[string]any{
			"owner": map[string]any{"type": "string"}, "repo": map[string]any{"type": "string"}}}},
	{"name": "set_visibility", "description": "Make a repository public or private", "inputSchema": map[string]any{
		"type": "object", "properties": map[string]any{
			"repo": map[string]any{"type": "string"}, "visibility": map[string]any{"type": "string"},
			"keep_forks": map[string]any{"type": "boolean"}}}},
	{"name": "ask_roots", "description": "Asks the client for its roots (a server request)", "inputSchema": map[string]any{
		"type": "object"}},
}

type server struct {
	rec *recorder
	mu  sync.Mutex
	n   int
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(v); err != nil {
		log.Printf("write: %v", err)
	}
}

func result(id json.RawMessage, r any) map[string]any {
	return map[string]any{"jsonrpc": "2.0", "id": id, "result": r}
}

func rpcError(id json.RawMessage, code int, msg string) map[string]any {
	return map[string]any{"jsonrpc": "2.0", "id": id, "error": map[string]any{"code": code, "message": msg}}
}

func text(s string) map[string]any {
	return map[string]any{"content": []any{map[string]any{"type": "text", "text": s}}, "isError": false}
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 8<<20))
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	var m message
	if err := json.Unmarshal(body, &m); err != nil {
		w.WriteHeader(http.StatusBadRequest)
		writeJSON(w, rpcError(nil, -32700, err.Error()))
		return
	}
	// As a Go server dispatches: whatever decoded into Method makes it a request.
	if m.Method == "" {
		s.rec.record(map[string]any{"kind": "answer", "id": m.ID, "result": m.Result, "error": m.Error})
		w.WriteHeader(http.StatusAccepted)
		return
	}
	if len(m.ID) == 0 {
		s.rec.record(map[string]any{"kind": "notification", "method": m.Method, "params": m.Params})
		w.WriteHeader(http.StatusAccepted)
		return
	}
	switch m.Method {
	case "initialize":
		var p struct {
			ProtocolVersion string `json:"protocolVersion"`
		}
		_ = json.Unmarshal(m.Params, &p)
		if p.ProtocolVersion == "" {
			p.ProtocolVersion = "2025-11-25"
		}
		writeJSON(w, result(m.ID, map[string]any{
			"protocolVersion": p.ProtocolVersion,
			"capabilities":    map[string]any{"tools": map[string]any{}, "prompts": map[string]any{}, "resources": map[string]any{}, "completions": map[string]any{}},
			"serverInfo":      map[string]any{"name": "go-mcp-peer", "version": "1"},
		}))
	case "ping":
		writeJSON(w, result(m.ID, map[string]any{}))
	case "tools/list":
		writeJSON(w, result(m.ID, map[string]any{"tools": tools}))
	case "tools/call":
		s.call(w, m)
	case "prompts/get":
		var p struct {
			Name      string            `json:"name"`
			Arguments map[string]string `json:"arguments"`
		}
		if err := json.Unmarshal(m.Params, &p); err != nil {
			writeJSON(w, rpcError(m.ID, -32602, err.Error()))
			return
		}
		s.rec.record(map[string]any{"kind": "prompt", "name": p.Name, "arguments": p.Arguments})
		writeJSON(w, result(m.ID, map[string]any{"messages": []any{map[string]any{"role": "user", "content": map[string]any{"type": "text", "text": "prompt " + p.Name}}}}))
	case "resources/read":
		var p struct {
			URI string `json:"uri"`
		}
		if err := json.Unmarshal(m.Params, &p); err != nil {
			writeJSON(w, rpcError(m.ID, -32602, err.Error()))
			return
		}
		s.rec.record(map[string]any{"kind": "read", "uri": p.URI})
		writeJSON(w, result(m.ID, map[string]any{"contents": []any{map[string]any{"uri": p.URI, "text": "contents of " + p.URI}}}))
	case "completion/complete":
		var p struct {
			Ref struct {
				Type string `json:"type"`
				Name string `json:"name"`
				URI  string `json:"uri"`
			} `json:"ref"`
			Argument struct {
				Name  string `json:"name"`
				Value string `json:"value"`
			} `json:"argument"`
		}
		if err := json.Unmarshal(m.Params, &p); err != nil {
			writeJSON(w, rpcError(m.ID, -32602, err.Error()))
			return
		}
		s.rec.record(map[string]any{"kind": "complete", "ref": p.Ref, "argument": p.Argument})
		writeJSON(w, result(m.ID, map[string]any{"completion": map[string]any{"values": []string{p.Argument.Value + "1"}}}))
	default:
		writeJSON(w, rpcError(m.ID, -32601, "Method not found: "+m.Method))
	}
}

func (s *server) call(w http.ResponseWriter, m message) {
	var p callParams
	if err := json.Unmarshal(m.Params, &p); err != nil {
		writeJSON(w, rpcError(m.ID, -32602, err.Error()))
		return
	}
	if len(p.Arguments) == 0 {
		p.Arguments = json.RawMessage("{}")
	}
	var args any
	switch p.Name {
	case "get_issue", "delete_repository":
		var a issueArgs
		if err := json.Unmarshal(p.Arguments, &a); err != nil {
			writeJSON(w, rpcError(m.ID, -32602, err.Error()))
			return
		}
		args = a
	case "set_visibility":
		var a visibilityArgs
		if err := json.Unmarshal(p.Arguments, &a); err != nil {
			writeJSON(w, rpcError(m.ID, -32602, err.Error()))
			return
		}
		args = a
	case "ask_roots":
		args = map[string]any{}
	default:
		writeJSON(w, rpcError(m.ID, -32602, "Unknown tool: "+p.Name))
		return
	}
	s.rec.record(map[string]any{"kind": "call", "tool": p.Name, "arguments": args})
	if p.Name != "ask_roots" {
		writeJSON(w, result(m.ID, text(fmt.Sprintf("%s ran", p.Name))))
		return
	}
	// A server request on the response stream, then the result.
	s.mu.Lock()
	s.n++
	sid := fmt.Sprintf("roots-%d", s.n)
	s.mu.Unlock()
	w.Header().Set("Content-Type", "text/event-stream")
	ask, _ := json.Marshal(map[string]any{"jsonrpc": "2.0", "id": sid, "method": "roots/list"})
	done, _ := json.Marshal(result(m.ID, text("asked "+sid)))
	fmt.Fprintf(w, "event: message\ndata: %s\n\nevent: message\ndata: %s\n\n", ask, done)
}

// folds prints, for every rune this toolchain's encoding/json folds, the rune it is taken
// for: "fold R S" for each step of a simple-fold orbit (bytes.EqualFold, Go up to 1.20) and
// "upper R S" for unicode.ToUpper(unicode.ToLower(R)) (foldName, Go 1.21 and later).
func folds() {
	w := bufio.NewWriter(os.Stdout)
	defer w.Flush()
	fmt.Fprintf(w, "unicode %s\n", unicode.Version)
	for r := rune(0); r <= unicode.MaxRune; r++ {
		if !utf8.ValidRune(r) {
			continue
		}
		if f := unicode.SimpleFold(r); f != r {
			fmt.Fprintf(w, "fold %X %X\n", r, f)
		}
		if u := unicode.ToUpper(unicode.ToLower(r)); u != r {
			fmt.Fprintf(w, "upper %X %X\n", r, u)
		}
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "loopback address to serve on")
	logPath := flag.String("log", "", "where to append what was executed (JSON lines)")
	printFolds := flag.Bool("folds", false, "print the rune pairs encoding/json folds, and exit")
	flag.Parse()
	if *printFolds {
		folds()
		return
	}
	host, _, err := net.SplitHostPort(*listen)
	if err != nil || !strings.HasPrefix(host, "127.") {
		log.Fatalf("-listen %q: a 127.0.0.0/8 address is required", *listen)
	}
	if *logPath == "" {
		log.Fatal("-log is required")
	}
	out, err := os.OpenFile(*logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		log.Fatal(err)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("listening %s\n", ln.Addr())
	mux := http.NewServeMux()
	mux.Handle("/mcp", &server{rec: &recorder{out: out}})
	log.Fatal(http.Serve(ln, mux))
}
