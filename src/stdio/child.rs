//! One running stdio MCP server: newline-delimited JSON-RPC on its stdin and stdout, its
//! stderr in toolgate's log, and how it is stopped.
//!
//! - **Requests** get ids of our own on the way in (a counter), so that callers who reuse ids
//!   (every stateless client starts at 1) never collide on a shared child; the answer gets the
//!   caller's id back.
//! - **Lines** are bounded (`max_line`); a line that is not one strict JSON-RPC message, or is
//!   too long, means the child is broken: it is stopped and every pending call fails with a
//!   clear error (an MCP server must write nothing else on stdout).
//! - **Server→client messages** (sampling, elicitation, roots, notifications) that belong to no
//!   pending request go to the session's stream when one is open, else to a pending request's
//!   SSE stream, else into a bounded backlog for the next stream. Progress notifications go to
//!   the request whose `progressToken` they carry.
//! - **Stopping**: stdin is closed, then after `grace` the launcher gets SIGTERM (it stops the
//!   server's whole process group or cgroup: `launch.rs`), then SIGKILL; a child's cgroup is
//!   killed and removed last.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::mcp::jsonrpc::{self, Kind, Limits};
use crate::mcp::sse;

/// Server→client messages kept for a stream that is not open yet.
pub const MAX_BACKLOG: usize = 256;
/// Events buffered towards one open stream.
const STREAM_BUFFER: usize = 64;
/// The longest stderr line logged (the rest of the line is dropped).
const MAX_STDERR_LINE: usize = 4096;
/// stderr lines logged per second per child, after a burst of [`STDERR_BURST`].
const STDERR_PER_SECOND: u32 = 50;
const STDERR_BURST: u32 = 200;

/// How a child is run and bounded.
#[derive(Debug, Clone)]
pub struct ChildLimits {
    /// The longest line the child may write on stdout.
    pub max_line: usize,
    /// The longest a request waits for its answer.
    pub call_timeout: Duration,
    /// Between closing stdin and SIGTERM, and between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// A child with no call and no open stream for this long is stopped.
    pub idle_timeout: Duration,
}

/// Why a call to a child failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The child is gone (crashed, stopped, or broke the protocol).
    #[error("{0}")]
    Gone(String),
    #[error("the server did not answer within {0:?}")]
    Timeout(Duration),
    /// A request with this id is already waiting on this session.
    #[error("a request with id {0} is already in flight on this session")]
    DuplicateId(String),
}

/// What a request's answer looks like to the HTTP side.
#[derive(Debug)]
pub enum Answer {
    /// The response, with the caller's id (canonical JSON).
    Json(Vec<u8>),
    /// SSE events (already framed): related server messages, then the response.
    Stream(ReplyStream),
}

/// The events of one request answered as a stream; ends after the response.
#[derive(Debug)]
pub struct ReplyStream {
    pub rx: mpsc::Receiver<Result<Bytes, String>>,
    /// Removes the pending entry (and tells the child it was cancelled) if dropped unanswered.
    pub guard: PendingGuard,
}

enum Reply {
    Json(oneshot::Sender<Result<Vec<u8>, String>>),
    Stream(mpsc::Sender<Result<Bytes, String>>),
}

struct Pending {
    client_id: Value,
    progress: Option<Value>,
    reply: Reply,
}

#[derive(Default)]
struct Inner {
    pending: HashMap<u64, Pending>,
    /// The session's open stream (GET), if any.
    listener: Option<mpsc::Sender<Result<Bytes, String>>>,
    backlog: VecDeque<Bytes>,
    /// Set once the child is gone; every later call fails with it.
    dead: Option<String>,
}

/// A running stdio MCP server.
pub struct Child {
    /// `<server>.<n>`, for logs.
    pub name: String,
    pub server: String,
    pid: u32,
    limits: ChildLimits,
    stdin: tokio::sync::Mutex<Option<tokio::process::ChildStdin>>,
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    /// Calls in flight plus open streams: a busy child is never idle.
    busy: AtomicUsize,
    last_active: Mutex<Instant>,
    stop_tx: mpsc::Sender<()>,
    exited: watch::Receiver<Option<String>>,
}

impl std::fmt::Debug for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Child")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .finish()
    }
}

impl Drop for Child {
    /// Nobody can reach this child any more: stop it now rather than at its idle timeout.
    fn drop(&mut self) {
        let _ = self.stop_tx.try_send(());
    }
}

/// Counts a call or stream as activity for as long as it lives.
#[derive(Debug)]
pub struct Busy(Arc<Child>);

impl Busy {
    fn new(c: &Arc<Child>) -> Busy {
        c.busy.fetch_add(1, Ordering::SeqCst);
        c.touch();
        Busy(c.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Removes a pending request when its caller goes away before the answer.
#[derive(Debug)]
pub struct PendingGuard {
    child: Arc<Child>,
    id: u64,
    _busy: Busy,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let was_pending = self
            .child
            .inner
            .lock()
            .map(|mut i| i.pending.remove(&self.id).is_some())
            .unwrap_or(false);
        if was_pending {
            // Closing a stream is not cancellation in the handshake era; telling the server is
            // the polite thing anyway, so it stops working for nobody.
            let child = self.child.clone();
            let id = self.id;
            tokio::spawn(async move {
                let _ = child
                    .write_line(&cancelled(id, "the caller went away"))
                    .await;
            });
        }
    }
}

fn cancelled(id: u64, reason: &str) -> Vec<u8> {
    jsonrpc::canonical(&serde_json::json!({
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": id, "reason": reason},
    }))
}

/// What a started child needs from its owner.
pub struct Started {
    pub process: tokio::process::Child,
    pub name: String,
    pub server: String,
    pub limits: ChildLimits,
    /// The child's own cgroup, killed and removed after it exits.
    pub cgroup: Option<PathBuf>,
    /// Runs once the process has exited (frees its slot, forgets its session).
    pub on_exit: Box<dyn FnOnce() + Send>,
}

impl Child {
    /// Takes over a started launcher: its pipes, its exit, its idle timer.
    pub fn start(s: Started) -> Result<Arc<Child>, String> {
        let mut process = s.process;
        let pid = process.id().ok_or("the process exited at once")?;
        let stdin = process.stdin.take().ok_or("no stdin pipe")?;
        let stdout = process.stdout.take().ok_or("no stdout pipe")?;
        let stderr = process.stderr.take().ok_or("no stderr pipe")?;
        let (stop_tx, stop_rx) = mpsc::channel(1);
        let (exit_tx, exit_rx) = watch::channel(None);
        let child = Arc::new(Child {
            name: s.name,
            server: s.server,
            pid,
            limits: s.limits,
            stdin: tokio::sync::Mutex::new(Some(stdin)),
            inner: Mutex::new(Inner::default()),
            next_id: AtomicU64::new(1),
            busy: AtomicUsize::new(0),
            last_active: Mutex::new(Instant::now()),
            stop_tx,
            exited: exit_rx,
        });
        tokio::spawn(read_stdout(Arc::downgrade(&child), stdout));
        tokio::spawn(log_stderr(child.name.clone(), child.server.clone(), stderr));
        tokio::spawn(supervise(
            Arc::downgrade(&child),
            process,
            stop_rx,
            exit_tx,
            child.limits.clone(),
            s.cgroup,
            s.on_exit,
        ));
        Ok(child)
    }

    /// The launcher's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last_active.lock() {
            *t = Instant::now();
        }
    }

    /// Why the child is gone, once it is.
    pub fn gone(&self) -> Option<String> {
        self.inner.lock().ok().and_then(|i| i.dead.clone())
    }

    /// `true` once the process has exited and been reaped.
    pub fn exited(&self) -> bool {
        self.exited.borrow().is_some()
    }

    /// Waits until the process has exited (bounded by the caller).
    pub async fn wait_exit(&self) {
        let mut rx = self.exited.clone();
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Says when the process has exited, even after this handle is gone.
    pub fn exit_watch(&self) -> watch::Receiver<Option<String>> {
        self.exited.clone()
    }

    /// Idle: nothing in flight, no open stream, and no activity for `idle_timeout`.
    fn idle(&self) -> bool {
        self.busy.load(Ordering::SeqCst) == 0
            && self
                .last_active
                .lock()
                .map(|t| t.elapsed() >= self.limits.idle_timeout)
                .unwrap_or(true)
    }

    /// Stops the child (closing stdin, then SIGTERM, then SIGKILL); returns at once.
    pub fn stop(&self, why: &str) {
        self.die(why);
        let _ = self.stop_tx.try_send(());
    }

    /// Marks the child gone and fails every pending request and the open stream.
    fn die(&self, why: &str) {
        let (pending, listener) = match self.inner.lock() {
            Ok(mut i) => {
                if i.dead.is_none() {
                    i.dead = Some(why.to_string());
                }
                i.backlog.clear();
                (std::mem::take(&mut i.pending), i.listener.take())
            }
            Err(_) => return,
        };
        for (_, p) in pending {
            match p.reply {
                Reply::Json(tx) => {
                    let _ = tx.send(Err(why.to_string()));
                }
                Reply::Stream(tx) => {
                    let _ = tx.try_send(Err(why.to_string()));
                }
            }
        }
        drop(listener);
    }

    /// Writes one line (a newline is added) within the call timeout.
    async fn write_line(&self, line: &[u8]) -> Result<(), CallError> {
        let mut stdin = self.stdin.lock().await;
        let Some(w) = stdin.as_mut() else {
            return Err(CallError::Gone(self.gone().unwrap_or_else(|| {
                format!("stdio server {} is stopping", self.server)
            })));
        };
        let write = async {
            w.write_all(line).await?;
            w.write_all(b"\n").await?;
            w.flush().await
        };
        match tokio::time::timeout(self.limits.call_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                let why = format!(
                    "stdio server {} stopped reading its stdin ({e})",
                    self.server
                );
                drop(stdin);
                self.stop(&why);
                Err(CallError::Gone(why))
            }
            Err(_) => {
                let why = format!(
                    "stdio server {} did not read its stdin within {:?}",
                    self.server, self.limits.call_timeout
                );
                drop(stdin);
                self.stop(&why);
                Err(CallError::Gone(why))
            }
        }
    }

    /// Sends a notification or a response (to a server request): no answer is awaited.
    pub async fn send(self: &Arc<Self>, canonical: &[u8]) -> Result<(), CallError> {
        if let Some(why) = self.gone() {
            return Err(CallError::Gone(why));
        }
        let _busy = Busy::new(self);
        self.write_line(canonical).await
    }

    /// A client's `notifications/cancelled` names the client's id: send it with ours.
    pub async fn cancel(
        self: &Arc<Self>,
        client_id: &Value,
        reason: &str,
    ) -> Result<(), CallError> {
        let ours = self.inner.lock().ok().and_then(|i| {
            i.pending
                .iter()
                .find(|(_, p)| &p.client_id == client_id)
                .map(|(k, _)| *k)
        });
        match ours {
            Some(id) => self.write_line(&cancelled(id, reason)).await,
            None => Ok(()),
        }
    }

    /// Sends a request and returns its answer: JSON, or (`stream`) an SSE stream that also
    /// carries the server messages sent while it is pending.
    pub async fn request(
        self: &Arc<Self>,
        msg: &jsonrpc::Message,
        canonical: &[u8],
        stream: bool,
    ) -> Result<Answer, CallError> {
        let client_id = msg.id.clone().unwrap_or(Value::Null);
        let progress = msg
            .params()
            .and_then(|p| p.get("_meta"))
            .and_then(|m| m.get("progressToken"))
            .cloned();
        let busy = Busy::new(self);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let line = with_id(canonical, &client_id, id, &msg.value);
        let (reply, answer_rx) = if stream {
            let (tx, rx) = mpsc::channel(STREAM_BUFFER);
            (Reply::Stream(tx), Err(rx))
        } else {
            let (tx, rx) = oneshot::channel();
            (Reply::Json(tx), Ok(rx))
        };
        {
            let Ok(mut i) = self.inner.lock() else {
                return Err(CallError::Gone("internal state poisoned".into()));
            };
            if let Some(why) = &i.dead {
                return Err(CallError::Gone(why.clone()));
            }
            if i.pending.values().any(|p| p.client_id == client_id) {
                return Err(CallError::DuplicateId(jsonrpc::canonical_id(&client_id)));
            }
            i.pending.insert(
                id,
                Pending {
                    client_id,
                    progress,
                    reply,
                },
            );
        }
        let guard = PendingGuard {
            child: self.clone(),
            id,
            _busy: busy,
        };
        self.write_line(&line).await?;
        match answer_rx {
            Ok(rx) => match tokio::time::timeout(self.limits.call_timeout, rx).await {
                Ok(Ok(Ok(bytes))) => {
                    drop(guard);
                    Ok(Answer::Json(bytes))
                }
                Ok(Ok(Err(why))) => Err(CallError::Gone(why)),
                Ok(Err(_)) => {
                    Err(CallError::Gone(self.gone().unwrap_or_else(|| {
                        format!("stdio server {} went away", self.server)
                    })))
                }
                // The guard removes the entry and tells the server the call is cancelled.
                Err(_) => Err(CallError::Timeout(self.limits.call_timeout)),
            },
            Err(rx) => Ok(Answer::Stream(ReplyStream { rx, guard })),
        }
    }

    /// Is a stream of server messages open on this child?
    pub fn listening(&self) -> bool {
        self.inner
            .lock()
            .map(|i| i.listener.as_ref().is_some_and(|l| !l.is_closed()))
            .unwrap_or(false)
    }

    /// Opens the session's stream of server messages (one at a time: a new one replaces the
    /// old). The backlog is delivered first.
    pub fn listen(
        self: &Arc<Self>,
    ) -> Result<(mpsc::Receiver<Result<Bytes, String>>, Busy), CallError> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let Ok(mut i) = self.inner.lock() else {
            return Err(CallError::Gone("internal state poisoned".into()));
        };
        if let Some(why) = &i.dead {
            return Err(CallError::Gone(why.clone()));
        }
        while let Some(ev) = i.backlog.pop_front() {
            if tx.try_send(Ok(ev.clone())).is_err() {
                i.backlog.push_front(ev);
                break;
            }
        }
        i.listener = Some(tx);
        drop(i);
        Ok((rx, Busy::new(self)))
    }

    /// One line from stdout.
    fn on_line(self: &Arc<Self>, line: &[u8]) -> Result<(), String> {
        let value = jsonrpc::parse_value(
            line,
            Limits {
                max_bytes: self.limits.max_line,
                max_depth: 128,
                max_nodes: jsonrpc::MAX_UPSTREAM_NODES,
            },
        )
        .map_err(|e| format!("wrote a line that is not strict JSON on stdout ({e})"))?;
        let msg = jsonrpc::message(value)
            .map_err(|e| format!("wrote a line that is not JSON-RPC on stdout ({e})"))?;
        self.touch();
        match msg.kind {
            Kind::Response => {
                let id = msg.id.as_ref().and_then(Value::as_u64);
                let pending = id.and_then(|id| {
                    self.inner
                        .lock()
                        .ok()
                        .and_then(|mut i| i.pending.remove(&id))
                });
                let Some(p) = pending else {
                    // A late answer to a call that timed out or was cancelled.
                    tracing::debug!(child = %self.name, id = ?msg.id, "dropped an answer nobody waits for");
                    return Ok(());
                };
                let mut value = msg.value;
                if let Some(obj) = value.as_object_mut() {
                    obj.insert("id".into(), p.client_id);
                }
                let bytes = jsonrpc::canonical(&value);
                match p.reply {
                    Reply::Json(tx) => {
                        let _ = tx.send(Ok(bytes));
                    }
                    Reply::Stream(tx) => {
                        let _ = tx.try_send(Ok(event(bytes)));
                    }
                }
            }
            Kind::Request | Kind::Notification => self.route(msg),
        }
        Ok(())
    }

    /// Delivers a server→client message: to the request it belongs to, the open stream, a
    /// pending SSE request, or the backlog.
    fn route(self: &Arc<Self>, msg: jsonrpc::Message) {
        let token = msg.params().and_then(|p| p.get("progressToken")).cloned();
        let bytes = event(jsonrpc::canonical(&msg.value));
        let Ok(mut i) = self.inner.lock() else {
            return;
        };
        if let Some(token) = &token {
            for p in i.pending.values() {
                if p.progress.as_ref() == Some(token) {
                    if let Reply::Stream(tx) = &p.reply {
                        let _ = tx.try_send(Ok(bytes));
                        return;
                    }
                }
            }
        }
        if let Some(l) = &i.listener {
            if l.try_send(Ok(bytes.clone())).is_ok() {
                return;
            }
            if l.is_closed() {
                i.listener = None;
            }
        }
        // No open stream: the newest pending request that answers as a stream.
        let newest = i
            .pending
            .iter()
            .filter(|(_, p)| matches!(p.reply, Reply::Stream(_)))
            .max_by_key(|(k, _)| **k)
            .map(|(_, p)| &p.reply);
        if let Some(Reply::Stream(tx)) = newest {
            if tx.try_send(Ok(bytes.clone())).is_ok() {
                return;
            }
        }
        if i.backlog.len() < MAX_BACKLOG {
            i.backlog.push_back(bytes);
            return;
        }
        drop(i);
        tracing::warn!(child = %self.name, method = %msg.method, "no client stream to deliver a server message to; dropped");
        if msg.kind == Kind::Request {
            // The server would wait forever for an answer: tell it now.
            let answer = jsonrpc::error_body(
                msg.id.as_ref(),
                jsonrpc::code::INTERNAL_ERROR,
                "no client stream is open to deliver this request",
                None,
            );
            let child = self.clone();
            tokio::spawn(async move {
                let _ = child.write_line(&answer).await;
            });
        }
    }
}

/// One SSE `message` event carrying `json`.
fn event(json: Vec<u8>) -> Bytes {
    sse::Event {
        event: Some("message".into()),
        data: String::from_utf8(json).unwrap_or_default(),
        ..Default::default()
    }
    .to_bytes()
}

/// The canonical request with `id` in place of the caller's. Canonical JSON sorts keys, so
/// `"id"` comes first and is spliced; anything unexpected falls back to re-serializing.
pub fn with_id(canonical: &[u8], client_id: &Value, id: u64, value: &Value) -> Vec<u8> {
    let old = jsonrpc::canonical(client_id);
    let prefix_len = 6 + old.len();
    if canonical.starts_with(b"{\"id\":")
        && canonical.get(6..prefix_len) == Some(&old[..])
        && canonical.get(prefix_len) == Some(&b',')
    {
        let mut out = Vec::with_capacity(canonical.len() + 8);
        out.extend_from_slice(b"{\"id\":");
        out.extend_from_slice(id.to_string().as_bytes());
        out.extend_from_slice(&canonical[prefix_len..]);
        return out;
    }
    let mut v = value.clone();
    if let Some(o) = v.as_object_mut() {
        o.insert("id".into(), Value::from(id));
    }
    jsonrpc::canonical(&v)
}

/// Reads stdout line by line until EOF or a protocol violation.
async fn read_stdout(child: std::sync::Weak<Child>, mut stdout: tokio::process::ChildStdout) {
    let max_line = match child.upgrade() {
        Some(c) => c.limits.max_line,
        None => return,
    };
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let why = loop {
        let n = match stdout.read(&mut chunk).await {
            Ok(0) => break None,
            Ok(n) => n,
            Err(e) => break Some(format!("stdout failed: {e}")),
        };
        let Some(new) = chunk.get(..n) else {
            break None;
        };
        let mut start = 0;
        let mut scan_from = buf.len();
        buf.extend_from_slice(new);
        let mut violation = None;
        while let Some(pos) = buf
            .get(scan_from..)
            .and_then(|b| b.iter().position(|&c| c == b'\n'))
        {
            let end = scan_from + pos;
            let line = buf.get(start..end).unwrap_or_default();
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if !line.iter().all(u8::is_ascii_whitespace) {
                let Some(c) = child.upgrade() else {
                    return;
                };
                if line.len() > max_line {
                    violation = Some(format!(
                        "wrote a line of {} bytes on stdout; the limit is {max_line}",
                        line.len()
                    ));
                    break;
                }
                if let Err(e) = c.on_line(line) {
                    violation = Some(e);
                    break;
                }
            }
            start = end + 1;
            scan_from = start;
        }
        if violation.is_some() {
            break violation;
        }
        buf.drain(..start);
        if buf.len() > max_line {
            break Some(format!(
                "wrote more than {max_line} bytes on stdout without a newline"
            ));
        }
    };
    let Some(c) = child.upgrade() else {
        return;
    };
    match why {
        Some(violation) => {
            let why = format!("stdio server {} {violation}", c.server);
            tracing::warn!(child = %c.name, "{why}; stopping it");
            c.stop(&why);
        }
        None => {
            // EOF: the process is exiting; give it a moment so the reason names its status.
            let mut rx = c.exited.clone();
            let _ = tokio::time::timeout(Duration::from_millis(500), rx.wait_for(Option::is_some))
                .await;
            let status = rx.borrow().clone();
            let why = match status {
                Some(s) => format!("stdio server {} exited ({s})", c.server),
                None => format!("stdio server {} closed its stdout", c.server),
            };
            if c.gone().is_none() {
                tracing::warn!(child = %c.name, "{why}");
            }
            c.stop(&why);
        }
    }
}

/// Logs the child's stderr line by line with its server's name, at a bounded rate.
async fn log_stderr(name: String, server: String, mut stderr: tokio::process::ChildStderr) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut skipping = false;
    let mut tokens = STDERR_BURST;
    let mut window = Instant::now();
    let mut suppressed: u64 = 0;
    let emit = |line: &[u8], tokens: &mut u32, suppressed: &mut u64, window: &mut Instant| {
        if window.elapsed() >= Duration::from_secs(1) {
            *tokens = (*tokens + STDERR_PER_SECOND).min(STDERR_BURST);
            *window = Instant::now();
            if *suppressed > 0 {
                tracing::warn!(server = %server, child = %name, suppressed = *suppressed, "stderr lines not logged (rate limit)");
                *suppressed = 0;
            }
        }
        if *tokens == 0 {
            *suppressed += 1;
            return;
        }
        *tokens -= 1;
        let text = String::from_utf8_lossy(line);
        tracing::info!(server = %server, child = %name, "stderr: {}", text.trim_end());
    };
    loop {
        let n = match stderr.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in chunk.get(..n).unwrap_or_default() {
            if b == b'\n' {
                if !skipping {
                    emit(&buf, &mut tokens, &mut suppressed, &mut window);
                }
                buf.clear();
                skipping = false;
            } else if !skipping {
                buf.push(b);
                if buf.len() >= MAX_STDERR_LINE {
                    emit(&buf, &mut tokens, &mut suppressed, &mut window);
                    buf.clear();
                    skipping = true;
                }
            }
        }
    }
    if !buf.is_empty() && !skipping {
        emit(&buf, &mut tokens, &mut suppressed, &mut window);
    }
    if suppressed > 0 {
        tracing::warn!(server = %server, child = %name, suppressed, "stderr lines not logged (rate limit)");
    }
}

/// Owns the process: waits for it to exit, stops it when asked or idle, and cleans up.
async fn supervise(
    child: std::sync::Weak<Child>,
    mut process: tokio::process::Child,
    mut stop_rx: mpsc::Receiver<()>,
    exit_tx: watch::Sender<Option<String>>,
    limits: ChildLimits,
    cgroup: Option<PathBuf>,
    on_exit: Box<dyn FnOnce() + Send>,
) {
    let tick = (limits.idle_timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(5));
    let status = loop {
        let idle = tokio::time::sleep(tick);
        tokio::select! {
            s = process.wait() => break s,
            _ = stop_rx.recv() => break stop(&child, &mut process, &limits).await,
            _ = idle => {
                let Some(c) = child.upgrade() else {
                    break stop(&child, &mut process, &limits).await;
                };
                if c.idle() {
                    tracing::info!(child = %c.name, idle = ?limits.idle_timeout, "stopping an idle stdio server");
                    c.die(&format!("stdio server {} was stopped after {:?} idle", c.server, limits.idle_timeout));
                    drop(c);
                    break stop(&child, &mut process, &limits).await;
                }
            }
        }
    };
    let text = match &status {
        Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(s)) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        Err(e) => format!("wait failed: {e}"),
    };
    if let Some(dir) = cgroup {
        let _ = tokio::task::spawn_blocking(move || super::cgroup::remove_tree(&dir)).await;
    }
    if let Some(c) = child.upgrade() {
        c.die(&format!("stdio server {} exited ({text})", c.server));
        tracing::debug!(child = %c.name, "{text}");
    }
    // The slot is free before anyone waiting for the exit hears of it.
    on_exit();
    let _ = exit_tx.send(Some(text));
}

/// Closes stdin, waits `grace`, SIGTERMs the launcher (which stops the whole group), waits,
/// then SIGKILLs it.
async fn stop(
    child: &std::sync::Weak<Child>,
    process: &mut tokio::process::Child,
    limits: &ChildLimits,
) -> std::io::Result<std::process::ExitStatus> {
    if let Some(c) = child.upgrade() {
        c.stdin.lock().await.take();
    }
    if let Ok(s) = tokio::time::timeout(limits.grace, process.wait()).await {
        return s;
    }
    // `id()` is `None` once reaped: never signal a pid that may have been reused.
    if let Some(pid) = process
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let bound = limits.grace * 2 + Duration::from_secs(2);
    if let Ok(s) = tokio::time::timeout(bound, process.wait()).await {
        return s;
    }
    let _ = process.start_kill();
    process.wait().await
}
