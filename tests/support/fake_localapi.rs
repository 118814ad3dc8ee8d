//! A fake tailscaled LocalAPI on a unix socket, reproducing the real daemon's bytes
//! (reference/tailscale.md §2.2, §2.5; checked against tailscaled 1.96.4 with curl):
//!
//! - the Host rule: a `Host` other than `local-tailscaled.sock` (or none), or any `Origin` or
//!   `Referer` header, gets `403 invalid localapi request` with only `Content-Type` and
//!   `X-Content-Type-Options` headers (no `Tailscale-*` headers), before routing;
//! - plain-text error bodies ending in a newline (`no match for IP:port\n`);
//! - `status` as tab-indented JSON with a trailing newline (`json.Encoder`), `whois` as
//!   tab-indented JSON without one (`json.MarshalIndent`);
//! - `watch-ipn-bus` as a never-ending chunked stream of compact JSON lines;
//! - the userspace-mode WhoIs: a loopback `ip:port` resolves only when registered (proxymap),
//!   and an unmapped loopback lookup answers 404 after a configurable delay (the real daemon
//!   retries ~181 ms; reference/tailnet-lab.md finding 1).
//!
//! Tests configure identities, status, the cert pair and faults, push bus notifications, and
//! read call counts, WhoIs requests in flight, accepted connections and the recorded request
//! headers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc};
use tokio::task::{AbortHandle, JoinHandle};
use toolgate::tailnet::localapi::{LocalApi, LocalApiConfig};

/// What tailscaled 1.96.4 reports as its version.
pub const VERSION: &str = "1.96.4-t8cf541dfd-g62bc84ce7";
/// This fake node's MagicDNS name (with the trailing dot, as tailscaled writes it).
pub const SELF_DNS_NAME: &str = "toolgate.example.ts.net.";
/// The fake tailnet's name (`CurrentTailnet.Name`).
pub const TAILNET_NAME: &str = "example.com";
/// The fake MagicDNS suffix.
pub const MAGIC_DNS_SUFFIX: &str = "example.ts.net";
/// This node's tailnet IPv4.
pub const SELF_IPV4: &str = "100.100.1.1";
/// This node's tailnet IPv6.
pub const SELF_IPV6: &str = "fd7a:115c:a1e0::1";

/// A test-only P-256 key (SEC1, as tailscaled writes it) for `toolgate.example.ts.net`.
/// Generated once with openssl for these tests; it protects nothing.
pub const TEST_KEY_PEM: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIKvddrT/PzR2eltoSzXF5qnQhLFdivG9VGVwmD/w/ALKoAoGCCqGSM49
AwEHoUQDQgAEhz+yHBPXS1i9lOS7Pyayktb8bSq+BE4NeZybMXRqTd0qGXW+s5l0
844kK85FpuJ43/aJfeYQ0wRSJ0sw1pgAXw==
-----END EC PRIVATE KEY-----
";

/// The leaf (SAN `toolgate.example.ts.net`, valid 2026–2126) then its test CA.
pub const TEST_CHAIN_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIB5zCCAYygAwIBAgIUYhjtxr3dFYffJuiLLlCz5Ri/CPswCgYIKoZIzj0EAwIw
KzEpMCcGA1UEAwwgdG9vbGdhdGUgdGVzdCBDQSAoZmFrZSBMb2NhbEFQSSkwIBcN
MjYxMTMwMDIxMDE2WhgPMjEyNjExMDYwMjEwMTZaMCIxIDAeBgNVBAMMF3Rvb2xn
YXRlLmV4YW1wbGUudHMubmV0MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEhz+y
HBPXS1i9lOS7Pyayktb8bSq+BE4NeZybMXRqTd0qGXW+s5l0844kK85FpuJ43/aJ
feYQ0wRSJ0sw1pgAX6OBlDCBkTAiBgNVHREEGzAZghd0b29sZ2F0ZS5leGFtcGxl
LnRzLm5ldDAJBgNVHRMEAjAAMAsGA1UdDwQEAwIHgDATBgNVHSUEDDAKBggrBgEF
BQcDATAdBgNVHQ4EFgQUwIH3itAkMYbHha+kRRm1qDAdLX0wHwYDVR0jBBgwFoAU
hCj83Q9eBB7Of77ylX4OMI63/vAwCgYIKoZIzj0EAwIDSQAwRgIhAPE+BV0BqDKg
Pqzrlhu1/6OIbWoDCzADODAiyBWHGzMlAiEAjOe8rEzwVROk92pN8dPrAVLyAXVa
7jpdQlpPh0yHA74=
-----END CERTIFICATE-----
-----BEGIN CERTIFICATE-----
MIIBrTCCAVOgAwIBAgIUeHRG/N0+M0/rjvY1MZ3h7dw0I+UwCgYIKoZIzj0EAwIw
KzEpMCcGA1UEAwwgdG9vbGdhdGUgdGVzdCBDQSAoZmFrZSBMb2NhbEFQSSkwIBcN
MjYxMTMwMDIxMDE2WhgPMjEyNjExMDYwMjEwMTZaMCsxKTAnBgNVBAMMIHRvb2xn
YXRlIHRlc3QgQ0EgKGZha2UgTG9jYWxBUEkpMFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAEIaxa9cSS77ESCkHecULcU022Cgy+o9d5TaeZrAylZ5jwSlzJ2TM8VhX2
+MVH5To4blCFQfoWORmth+GpSmtGyaNTMFEwHQYDVR0OBBYEFIQo/N0PXgQezn++
8pV+DjCOt/7wMB8GA1UdIwQYMBaAFIQo/N0PXgQezn++8pV+DjCOt/7wMA8GA1Ud
EwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIgMEiM0R2r3VHqoofl4s68LE+4
xfUdU3GkaSccR+ZnyGICIQCrlOtZrSDyrgg4kGXMICHYV8OgE0jrTiP2fPUbQUPF
qA==
-----END CERTIFICATE-----
";

/// A switchable failure of one endpoint (or of all, see [`FakeLocalApi::set_global_fault`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status with this plain-text body (a newline is appended, as `http.Error`).
    Status(u16, String),
    /// Wait this long, then answer normally.
    Slow(Duration),
    /// Never answer (the connection stays open).
    Hang,
    /// 200 `application/json` with a body that is not JSON.
    Garbage,
    /// Close the connection without any response.
    Drop,
}

impl Fault {
    /// `404` with tailscaled's whois body.
    pub fn not_found() -> Self {
        Fault::Status(404, "no match for IP:port".into())
    }
    /// `403` as for a reader without permission.
    pub fn forbidden() -> Self {
        Fault::Status(403, "access denied".into())
    }
    /// `500` with a tailscaled-like body.
    pub fn internal() -> Self {
        Fault::Status(500, "no netmap available".into())
    }
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path (`/localapi/v0/whois`).
    pub path: String,
    /// The raw query (`addr=100.64.0.1%3A1234&proto=tcp`), empty when none.
    pub query: String,
    /// Header names (lowercase) and values, in order.
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The decoded value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<String> {
        parse_query(&self.query).remove(name)
    }
}

struct State {
    /// "ip:port" or "ip" or "nodekey:…" → whois JSON value.
    identities: HashMap<String, Value>,
    status: Value,
    cert_key_pem: String,
    cert_chain_pem: String,
    bus_initial: Value,
    faults: HashMap<String, (Fault, Option<usize>)>,
    global_fault: Option<Fault>,
    calls: HashMap<String, usize>,
    requests: Vec<RecordedRequest>,
    unmapped_loopback_delay: Duration,
    /// Set by `listen_tcp`: the Basic-auth password every request needs.
    required_token: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Bus lines; `None` ends every open bus stream.
    bus: broadcast::Sender<Option<String>>,
    accepted: AtomicUsize,
    /// WhoIs requests being handled right now, and the most ever at once.
    whois_in_flight: AtomicUsize,
    whois_max_in_flight: AtomicUsize,
    /// While `true`, unmapped loopback WhoIs requests wait (after their delay) until it is
    /// `false` again: a test holds them in flight as long as it needs, without a timing bound.
    loopback_hold: tokio::sync::watch::Sender<bool>,
    conns: Mutex<Vec<AbortHandle>>,
}

/// The fake daemon. Dropping it stops it.
pub struct FakeLocalApi {
    socket: PathBuf,
    _dir: tempfile::TempDir,
    shared: Arc<Shared>,
    accept: Mutex<Option<JoinHandle<()>>>,
    tcp: Mutex<Vec<JoinHandle<()>>>,
}

type Body = BoxBody<Bytes, Infallible>;

impl FakeLocalApi {
    /// Starts a fake on a fresh socket in a temporary directory, with the default status
    /// (Running, `toolgate.example.ts.net.`) and no identities.
    pub async fn start() -> FakeLocalApi {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tailscaled.sock");
        let (bus, _) = broadcast::channel(256);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                identities: HashMap::new(),
                status: default_status(),
                cert_key_pem: TEST_KEY_PEM.into(),
                cert_chain_pem: TEST_CHAIN_PEM.into(),
                bus_initial: default_bus_initial(),
                faults: HashMap::new(),
                global_fault: None,
                calls: HashMap::new(),
                requests: Vec::new(),
                unmapped_loopback_delay: Duration::ZERO,
                required_token: None,
            }),
            bus,
            accepted: AtomicUsize::new(0),
            whois_in_flight: AtomicUsize::new(0),
            whois_max_in_flight: AtomicUsize::new(0),
            loopback_hold: tokio::sync::watch::Sender::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let fake = FakeLocalApi {
            socket,
            _dir: dir,
            shared,
            accept: Mutex::new(None),
            tcp: Mutex::new(Vec::new()),
        };
        fake.listen();
        fake
    }

    fn listen(&self) {
        let _ = std::fs::remove_file(&self.socket);
        let listener = UnixListener::bind(&self.socket).unwrap();
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let conn_shared = shared.clone();
                let task = tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(conn_shared.clone(), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                shared.conns.lock().unwrap().push(task.abort_handle());
            }
        });
        *self.accept.lock().unwrap() = Some(task);
    }

    /// Also listens on `127.0.0.1:0` over TCP, like the macOS GUI variants: every request on
    /// any listener then needs HTTP Basic auth with password `token` (no header → 401
    /// `auth required`, wrong password → 403 `bad password`), and a loopback `Host` is accepted.
    /// Returns the TCP address.
    pub async fn listen_tcp(&self, token: &str) -> SocketAddr {
        self.shared.state.lock().unwrap().required_token = Some(token.to_owned());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let conn_shared = shared.clone();
                let task = tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(conn_shared.clone(), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                shared.conns.lock().unwrap().push(task.abort_handle());
            }
        });
        self.tcp.lock().unwrap().push(task);
        addr
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// A client of this fake with default settings.
    pub fn client(&self) -> LocalApi {
        LocalApi::new(self.config())
    }

    /// Default client settings pointing at this fake (adjust, then `LocalApi::new`).
    pub fn config(&self) -> LocalApiConfig {
        LocalApiConfig::unix(&self.socket)
    }

    /// Registers the WhoIs answer for `key`: `"ip:port"` (exact, also the only way a loopback
    /// address resolves), `"ip"` (any port; non-loopback only), or `"nodekey:<hex>"`.
    pub fn add_identity(&self, key: &str, whois: Value) {
        self.shared
            .state
            .lock()
            .unwrap()
            .identities
            .insert(key.to_owned(), whois);
    }

    /// Forgets the WhoIs answer for `key`.
    pub fn remove_identity(&self, key: &str) {
        self.shared.state.lock().unwrap().identities.remove(key);
    }

    /// Replaces the status JSON (`Peer` is dropped when the client asks `peers=false`).
    pub fn set_status(&self, status: Value) {
        self.shared.state.lock().unwrap().status = status;
    }

    /// Replaces the key and chain that `cert/` serves.
    pub fn set_cert_pair(&self, key_pem: &str, chain_pem: &str) {
        let mut s = self.shared.state.lock().unwrap();
        s.cert_key_pem = key_pem.to_owned();
        s.cert_chain_pem = chain_pem.to_owned();
    }

    /// Replaces the first notification of every new bus watcher.
    pub fn set_bus_initial(&self, notify: Value) {
        self.shared.state.lock().unwrap().bus_initial = notify;
    }

    /// How long an unmapped loopback WhoIs takes before its 404 (real 1.96.4: ~181 ms).
    pub fn set_unmapped_loopback_delay(&self, d: Duration) {
        self.shared.state.lock().unwrap().unmapped_loopback_delay = d;
    }

    /// Holds every unmapped loopback WhoIs in flight (`true`) until released (`false`).
    pub fn hold_unmapped_loopback(&self, held: bool) {
        self.shared.loopback_hold.send_replace(held);
    }

    /// Makes `endpoint` (`whois`, `status`, `cert`, `watch-ipn-bus`, `prefs`, …) fail.
    pub fn set_fault(&self, endpoint: &str, fault: Fault) {
        self.shared
            .state
            .lock()
            .unwrap()
            .faults
            .insert(endpoint.to_owned(), (fault, None));
    }

    /// Makes the next `times` calls of `endpoint` fail, then answers normally again.
    pub fn set_fault_times(&self, endpoint: &str, fault: Fault, times: usize) {
        self.shared
            .state
            .lock()
            .unwrap()
            .faults
            .insert(endpoint.to_owned(), (fault, Some(times)));
    }

    /// Makes every endpoint fail (after the Host check), until cleared.
    pub fn set_global_fault(&self, fault: Fault) {
        self.shared.state.lock().unwrap().global_fault = Some(fault);
    }

    /// Clears every fault.
    pub fn clear_faults(&self) {
        let mut s = self.shared.state.lock().unwrap();
        s.faults.clear();
        s.global_fault = None;
    }

    /// Sends a notification (compact JSON, one line) to every open bus watcher.
    pub fn push_notify<T: Serialize>(&self, notify: &T) {
        self.push_raw_line(&serde_json::to_string(notify).unwrap());
    }

    /// Sends `line` + `\n` verbatim to every open bus watcher (for garbage lines).
    pub fn push_raw_line(&self, line: &str) {
        let _ = self.shared.bus.send(Some(line.to_owned()));
    }

    /// Ends every open bus stream (the response body finishes).
    pub fn end_bus_streams(&self) {
        let _ = self.shared.bus.send(None);
    }

    /// Open bus watchers right now.
    pub fn bus_watchers(&self) -> usize {
        self.shared.bus.receiver_count()
    }

    /// Requests that reached `endpoint` (counted on arrival, faults and 403s included).
    pub fn calls(&self, endpoint: &str) -> usize {
        self.shared
            .state
            .lock()
            .unwrap()
            .calls
            .get(endpoint)
            .copied()
            .unwrap_or(0)
    }

    /// WhoIs requests being handled right now (from arrival to response, faults included).
    pub fn whois_in_flight(&self) -> usize {
        self.shared.whois_in_flight.load(Ordering::SeqCst)
    }

    /// The most WhoIs requests ever handled at once (since start or the last reset).
    pub fn whois_max_in_flight(&self) -> usize {
        self.shared.whois_max_in_flight.load(Ordering::SeqCst)
    }

    /// Resets [`FakeLocalApi::whois_max_in_flight`] to the current in-flight count.
    pub fn reset_whois_max_in_flight(&self) {
        let now = self.shared.whois_in_flight.load(Ordering::SeqCst);
        self.shared.whois_max_in_flight.store(now, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections_accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Every request seen so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.state.lock().unwrap().requests.clone()
    }

    /// "Socket gone": stops accepting, drops every open connection and removes the socket.
    pub fn stop(&self) {
        if let Some(t) = self.accept.lock().unwrap().take() {
            t.abort();
        }
        for c in self.shared.conns.lock().unwrap().drain(..) {
            c.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Comes back on the same socket path after [`FakeLocalApi::stop`] (a daemon restart).
    pub fn restart(&self) {
        self.stop();
        self.listen();
    }
}

impl Drop for FakeLocalApi {
    fn drop(&mut self) {
        self.stop();
        for t in self.tcp.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

// --- fixtures ------------------------------------------------------------------------------

/// The default status: Running, this node `toolgate.example.ts.net.`, one peer.
pub fn default_status() -> Value {
    json!({
        "Version": VERSION,
        "TUN": false,
        "BackendState": "Running",
        "HaveNodeKey": true,
        "AuthURL": "",
        "TailscaleIPs": [SELF_IPV4, SELF_IPV6],
        "Self": {
            "ID": "nTOOLGATE1CNTRL",
            "PublicKey": "nodekey:1111111111111111111111111111111111111111111111111111111111111111",
            "HostName": "toolgate",
            "DNSName": SELF_DNS_NAME,
            "OS": "linux",
            "UserID": 1001,
            "TailscaleIPs": [SELF_IPV4, SELF_IPV6],
            "AllowedIPs": [format!("{SELF_IPV4}/32"), format!("{SELF_IPV6}/128")],
            "Tags": ["tag:toolgate"],
            "Addrs": null,
            "CurAddr": "",
            "Relay": "",
            "PeerRelay": "",
            "RxBytes": 0,
            "TxBytes": 0,
            "Created": "2026-01-02T03:04:05Z",
            "LastWrite": "0001-01-01T00:00:00Z",
            "LastSeen": "0001-01-01T00:00:00Z",
            "LastHandshake": "0001-01-01T00:00:00Z",
            "Online": true,
            "ExitNode": false,
            "ExitNodeOption": false,
            "Active": false,
            "PeerAPIURL": [format!("http://{SELF_IPV4}:41234")],
            "TaildropTarget": 0,
            "NoFileSharingReason": "",
            "InNetworkMap": true,
            "InMagicSock": false,
            "InEngine": false
        },
        "Health": [],
        "MagicDNSSuffix": MAGIC_DNS_SUFFIX,
        "CurrentTailnet": {
            "Name": TAILNET_NAME,
            "MagicDNSSuffix": MAGIC_DNS_SUFFIX,
            "MagicDNSEnabled": true
        },
        "CertDomains": ["toolgate.example.ts.net"],
        "Peer": {
            "nodekey:2222222222222222222222222222222222222222222222222222222222222222": {
                "ID": "nALICE1CNTRL",
                "PublicKey": "nodekey:2222222222222222222222222222222222222222222222222222222222222222",
                "HostName": "alice-laptop",
                "DNSName": "alice-laptop.example.ts.net.",
                "OS": "macOS",
                "UserID": 2002,
                "TailscaleIPs": ["100.64.0.1", "fd7a:115c:a1e0::a"],
                "Online": true
            }
        },
        "User": {
            "1001": {"ID": 1001, "LoginName": "tagged-devices", "DisplayName": "Tagged Devices"},
            "2002": {"ID": 2002, "LoginName": "alice@example.com", "DisplayName": "Alice Example"}
        },
        "ClientVersion": null
    })
}

/// The first bus line a watcher gets (logged in, Running).
pub fn default_bus_initial() -> Value {
    json!({
        "Version": VERSION,
        "SessionID": "565b97120cf62972",
        "ErrMessage": null,
        "LoginFinished": null,
        "State": 6,
        "Prefs": {"ControlURL": "", "WantRunning": true, "LoggedOut": false, "Hostname": "toolgate",
                  "AdvertiseTags": ["tag:toolgate"], "CorpDNS": true},
        "NetMap": null,
        "Engine": null,
        "BrowseToURL": null,
        "DriveShares": null
    })
}

/// A WhoIs answer for a user's node `host` (`host.example.ts.net.`) at `ip`, with `caps` as
/// the CapMap (`Value::Null` for none).
pub fn user_whois(ip: &str, host: &str, login: &str, display: &str, caps: Value) -> Value {
    json!({
        "Node": {
            "ID": 5_000_000_000_001_i64,
            "StableID": format!("n{host}CNTRL"),
            "Name": format!("{host}.{MAGIC_DNS_SUFFIX}."),
            "User": 2002,
            "Key": "nodekey:2222222222222222222222222222222222222222222222222222222222222222",
            "KeyExpiry": "2027-05-01T00:00:00Z",
            "Machine": "mkey:3333333333333333333333333333333333333333333333333333333333333333",
            "DiscoKey": "discokey:4444444444444444444444444444444444444444444444444444444444444444",
            "Addresses": [format!("{ip}/32"), "fd7a:115c:a1e0::a/128"],
            "AllowedIPs": [format!("{ip}/32"), "fd7a:115c:a1e0::a/128"],
            "HomeDERP": 1,
            "Hostinfo": {"OS": "macOS", "OSVersion": "15.6.1", "Hostname": host, "IPNVersion": VERSION},
            "Created": "2026-01-02T03:04:05Z",
            "Cap": 133,
            "Online": true,
            "MachineAuthorized": true,
            "ComputedName": host,
            "ComputedNameWithHost": host
        },
        "UserProfile": {"ID": 2002, "LoginName": login, "DisplayName": display,
                        "ProfilePicURL": "https://example.com/alice.png"},
        "CapMap": caps
    })
}

/// A WhoIs answer for a tagged node `host` at `ip` (login `tagged-devices`).
pub fn tagged_whois(ip: &str, host: &str, tags: &[&str], caps: Value) -> Value {
    json!({
        "Node": {
            "ID": 7001,
            "StableID": format!("n{host}CNTRL"),
            "Name": format!("{host}.{MAGIC_DNS_SUFFIX}."),
            "User": 1001,
            "Key": "nodekey:5555555555555555555555555555555555555555555555555555555555555555",
            "Machine": "mkey:6666666666666666666666666666666666666666666666666666666666666666",
            "Addresses": [format!("{ip}/32")],
            "AllowedIPs": [format!("{ip}/32")],
            "Hostinfo": {"OS": "linux", "Hostname": host},
            "Cap": 133,
            "Tags": tags,
            "MachineAuthorized": true,
            "ComputedName": host,
            "ComputedNameWithHost": host
        },
        "UserProfile": {"ID": 2147455555_i64, "LoginName": "tagged-devices", "DisplayName": "Tagged Devices"},
        "CapMap": caps
    })
}

/// Go's `json.MarshalIndent(v, "", "\t")`.
pub fn go_indent(v: &Value) -> String {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser).unwrap();
    String::from_utf8(out).unwrap()
}

// --- the server ----------------------------------------------------------------------------

fn endpoint_name(path: &str) -> String {
    let rest = path.strip_prefix("/localapi/v0/").unwrap_or(path);
    match rest.split_once('/') {
        Some(("cert", _)) => "cert".to_owned(),
        _ => rest.to_owned(),
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// A response with the headers tailscaled puts on every routed reply.
fn reply(code: u16, content_type: &str, body: Body) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(
            "Content-Security-Policy",
            "default-src 'none'; frame-ancestors 'none'; script-src 'none'; script-src-elem 'none'; script-src-attr 'none'",
        )
        .header("Content-Type", content_type)
        .header("Tailscale-Cap", "133")
        .header("Tailscale-Version", VERSION)
        .header("X-Content-Type-Options", "nosniff")
        .header("X-Frame-Options", "DENY")
        .body(body)
        .unwrap()
}

/// Go's `http.Error`: text plus newline.
fn text_error(code: u16, msg: &str) -> Response<Body> {
    reply(code, "text/plain; charset=utf-8", full(format!("{msg}\n")))
}

fn json_reply(body: String) -> Response<Body> {
    reply(200, "application/json", full(body))
}

/// Waits forever (the `Hang` fault): the connection stays open, no response is written.
async fn hang() -> Response<Body> {
    std::future::pending::<Response<Body>>().await
}

/// Counts a WhoIs request in flight while it lives.
struct WhoisInFlight(Arc<Shared>);

impl WhoisInFlight {
    fn new(shared: &Arc<Shared>) -> Self {
        let now = shared.whois_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.whois_max_in_flight.fetch_max(now, Ordering::SeqCst);
        WhoisInFlight(shared.clone())
    }
}

impl Drop for WhoisInFlight {
    fn drop(&mut self) {
        self.0.whois_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, DropConn> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let endpoint = endpoint_name(&path);
    let _in_flight = (endpoint == "whois").then(|| WhoisInFlight::new(&shared));
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let host = req
        .headers()
        .get("host")
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
    let browser = req.headers().contains_key("origin") || req.headers().contains_key("referer");

    let authorization = req
        .headers()
        .get("authorization")
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());

    let (fault, required_token) = {
        let mut s = shared.state.lock().unwrap();
        s.requests.push(RecordedRequest {
            method: req.method().to_string(),
            path: path.clone(),
            query: query.clone(),
            headers,
        });
        *s.calls.entry(endpoint.clone()).or_default() += 1;
        let mut fault = s.global_fault.clone();
        if let Some((f, remaining)) = s.faults.get_mut(&endpoint) {
            match remaining {
                None => fault = Some(f.clone()),
                Some(0) => {}
                Some(n) => {
                    *n -= 1;
                    fault = Some(f.clone());
                }
            }
        }
        (fault, s.required_token.clone())
    };

    // tailscaled's ServeHTTP: the Host rule and the browser-header rule come before routing,
    // and these 403s carry none of the Tailscale-* headers.
    let host_ok = match host.as_deref() {
        None | Some("") | Some("local-tailscaled.sock") => true,
        // With a required password, a loopback Host is accepted too.
        Some(h) => {
            required_token.is_some()
                && (h.starts_with("localhost")
                    || h.starts_with("127.0.0.1")
                    || h.starts_with("[::1]"))
        }
    };
    if !host_ok || browser {
        return Ok(Response::builder()
            .status(403)
            .header("Content-Type", "text/plain; charset=utf-8")
            .header("X-Content-Type-Options", "nosniff")
            .body(full("invalid localapi request\n"))
            .unwrap());
    }

    if let Some(token) = required_token {
        match authorization.as_deref().and_then(basic_password) {
            None => return Ok(text_error(401, "auth required")),
            Some(p) if p != token => return Ok(text_error(403, "bad password")),
            Some(_) => {}
        }
    }

    match fault {
        Some(Fault::Status(code, body)) => return Ok(text_error(code, &body)),
        Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
        Some(Fault::Hang) => return Ok(hang().await),
        Some(Fault::Garbage) => {
            return Ok(reply(
                200,
                "application/json",
                full("\u{0}{\"Node\": garbage ]]"),
            ));
        }
        Some(Fault::Drop) => return Err(DropConn),
        None => {}
    }

    let params = parse_query(&query);
    let resp = if !path.starts_with("/localapi/v0/") {
        text_error(404, "404 page not found")
    } else {
        match endpoint.as_str() {
            "status" => status(&shared, &params),
            "whois" => whois(&shared, &params).await,
            "cert" => cert(&shared, &path, &params),
            "watch-ipn-bus" => bus(&shared, &params),
            "prefs" => json_reply(go_indent(&json!({
                "ControlURL": "", "WantRunning": true, "LoggedOut": false, "Hostname": "toolgate",
                "AdvertiseTags": ["tag:toolgate"], "CorpDNS": true
            }))),
            _ => text_error(404, "404 page not found"),
        }
    };
    Ok(resp)
}

/// Returned by the handler to make hyper drop the connection without a response.
#[derive(Debug)]
struct DropConn;

impl std::fmt::Display for DropConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fault: drop connection")
    }
}

impl std::error::Error for DropConn {}

fn status(shared: &Shared, params: &HashMap<String, String>) -> Response<Body> {
    let mut st = shared.state.lock().unwrap().status.clone();
    if params.get("peers").map(String::as_str) == Some("false")
        && let Some(obj) = st.as_object_mut()
    {
        obj.insert("Peer".into(), Value::Null);
    }
    // json.Encoder with SetIndent("", "\t"): a trailing newline.
    json_reply(go_indent(&st) + "\n")
}

async fn whois(shared: &Shared, params: &HashMap<String, String>) -> Response<Body> {
    let Some(addr) = params.get("addr").filter(|a| !a.is_empty()) else {
        return text_error(400, "missing 'addr' parameter");
    };
    let (found, loopback_miss_delay) = {
        let s = shared.state.lock().unwrap();
        if let Some(hex) = addr.strip_prefix("nodekey:") {
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return text_error(400, "invalid nodekey in 'addr' parameter");
            }
            (s.identities.get(addr.as_str()).cloned(), None)
        } else {
            let (ip, port) = match addr.parse::<SocketAddr>() {
                Ok(sa) => (sa.ip(), sa.port()),
                Err(_) => match addr.parse::<IpAddr>() {
                    Ok(ip) => (ip, 0),
                    Err(_) => return text_error(400, "invalid 'addr' parameter"),
                },
            };
            let exact = SocketAddr::new(ip, port).to_string();
            let found = s.identities.get(&exact).cloned().or_else(|| {
                // Only the proxymap (exact ip:port) names a loopback peer.
                if ip.is_loopback() {
                    None
                } else {
                    s.identities.get(&ip.to_string()).cloned()
                }
            });
            let delay = (found.is_none() && ip.is_loopback()).then_some(s.unmapped_loopback_delay);
            (found, delay)
        }
    };
    match found {
        Some(v) => json_reply(go_indent(&v)), // MarshalIndent: no trailing newline
        None => {
            if let Some(d) = loopback_miss_delay {
                if !d.is_zero() {
                    // The scenario: tailscaled's slow answer for an unmapped loopback address.
                    tokio::time::sleep(d).await;
                }
                let mut hold = shared.loopback_hold.subscribe();
                let _ = hold.wait_for(|held| !held).await;
            }
            text_error(404, "no match for IP:port")
        }
    }
}

fn cert(shared: &Shared, path: &str, params: &HashMap<String, String>) -> Response<Body> {
    let domain = percent_decode(path.strip_prefix("/localapi/v0/cert/").unwrap_or(""));
    let s = shared.state.lock().unwrap();
    let domains: Vec<String> = s.status["CertDomains"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if domains.is_empty() {
        return text_error(500, "no netmap available");
    }
    if !domains.contains(&domain) {
        return text_error(
            500,
            &format!(
                "invalid domain {domain:?}; must be one of [{}]",
                domains.join(" ")
            ),
        );
    }
    let body = match params.get("type").map(String::as_str).unwrap_or("cert") {
        "pair" => format!("{}{}", s.cert_key_pem, s.cert_chain_pem),
        "key" => s.cert_key_pem.clone(),
        "cert" | "crt" => s.cert_chain_pem.clone(),
        other => return text_error(400, &format!("invalid type {other:?}")),
    };
    reply(200, "text/plain", full(body))
}

fn bus(shared: &Shared, params: &HashMap<String, String>) -> Response<Body> {
    let mask: u64 = params.get("mask").and_then(|m| m.parse().ok()).unwrap_or(0);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut sub = shared.bus.subscribe();
    let initial = shared.state.lock().unwrap().bus_initial.clone();
    tokio::spawn(async move {
        // InitialState | InitialPrefs | InitialNetMap: the current state first.
        if mask & (2 | 4 | 8) != 0 {
            let line = serde_json::to_string(&initial).unwrap() + "\n";
            if tx.send(Bytes::from(line)).await.is_err() {
                return;
            }
        }
        loop {
            let msg = tokio::select! {
                () = tx.closed() => return,
                msg = sub.recv() => msg,
            };
            match msg {
                Ok(Some(line)) => {
                    if tx.send(Bytes::from(line + "\n")).await.is_err() {
                        return;
                    }
                }
                Ok(None) | Err(broadcast::error::RecvError::Closed) => return,
                Err(broadcast::error::RecvError::Lagged(_)) => {}
            }
        }
    });
    reply(200, "application/json", ChannelBody { rx }.boxed())
}

/// A response body fed by a channel (the never-ending bus stream).
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (
                percent_decode(&k.replace('+', " ")),
                percent_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The password of an HTTP Basic `Authorization` header.
fn basic_password(h: &str) -> Option<String> {
    let b64 = h.strip_prefix("Basic ")?;
    let decoded = base64_decode(b64.trim())?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':').map(|(_, p)| p.to_owned())
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = T.iter().position(|t| *t == c)? as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    Some(out)
}
