//! `tls: auto`: HTTPS with the certificate tailscaled holds for this node's MagicDNS name
//! (reference/tailscale.md §3.5, the way tsnet's `GetCertificate` does it).
//!
//! - At start-up [`LocalApiCerts::load`] reads `status` for `CertDomains` and fetches
//!   `cert/<domain>?type=pair` for each; without a usable certificate it fails with a message
//!   that says why (HTTPS not enabled on the tailnet, no permission, not logged in), quoting
//!   tailscaled's own text.
//! - The TLS handshake picks the certificate by SNI: an FQDN must be one of `CertDomains`, a
//!   bare label (`toolgate`) expands to the cert domain it starts (`toolgate.<tailnet>.ts.net`),
//!   no SNI (a client dialing an IP) gets the first domain. Anything else fails the handshake.
//! - A background task ([`LocalApiCerts::spawn_renewal`]) re-reads `status` and the pair every
//!   `check_every` (picking up tailscaled's own renewals), and once less than
//!   `renew_before` (default: a third of the certificate's lifetime) remains it asks with
//!   `min_validity`, which makes tailscaled renew synchronously. A failed refresh keeps
//!   serving the current certificate and retries sooner.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::localapi::{CertPair, LocalApi, LocalApiConfig, LocalApiError};
use super::types::BackendState;

/// How often the certificate is re-read from tailscaled.
pub const DEFAULT_CHECK_EVERY: Duration = Duration::from_secs(60 * 60);
/// How soon a failed refresh is retried.
pub const DEFAULT_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);
/// Bound of one cert call: the first issuance goes through ACME DNS-01 and takes seconds.
pub const CERT_CALL_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound of the TLS handshake on an accepted connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Renewal behaviour.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// How often to re-read the certificate.
    pub check_every: Duration,
    /// Renew once less than this validity remains; `None`: a third of the lifetime.
    pub renew_before: Option<Duration>,
    /// How soon to retry after a failed refresh.
    pub retry_after_failure: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            check_every: DEFAULT_CHECK_EVERY,
            renew_before: None,
            retry_after_failure: DEFAULT_RETRY_AFTER_FAILURE,
        }
    }
}

/// One loaded certificate.
#[derive(Clone, Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
}

#[derive(Debug, Default)]
struct CertState {
    /// `Status.CertDomains`, as last read.
    domains: Vec<String>,
    certs: HashMap<String, Loaded>,
}

/// The certificates of this node, kept fresh; a rustls [`ResolvesServerCert`].
#[derive(Debug)]
pub struct LocalApiCerts {
    api: LocalApi,
    settings: TlsSettings,
    state: RwLock<CertState>,
}

/// What a certificate looks like now (for `doctor` and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The cert domain.
    pub domain: String,
    /// Start of validity.
    pub not_before: DateTime<Utc>,
    /// End of validity.
    pub not_after: DateTime<Utc>,
}

impl LocalApiCerts {
    /// Reads `CertDomains` and fetches every certificate. Fails, with the reason and what to
    /// do, when not one certificate can be had.
    pub async fn load(api: &LocalApi, settings: TlsSettings) -> Result<Arc<LocalApiCerts>, String> {
        let mut config: LocalApiConfig = api.config().clone();
        config.timeout = config.timeout.max(CERT_CALL_TIMEOUT);
        let certs = Arc::new(LocalApiCerts {
            api: LocalApi::new(config),
            settings,
            state: RwLock::new(CertState::default()),
        });
        certs.refresh().await?;
        Ok(certs)
    }

    /// A rustls server configuration that resolves through these certificates (ALPN h2 and
    /// http/1.1, TLS 1.2 and 1.3, ring).
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(cfg)
    }

    /// A TLS acceptor over [`LocalApiCerts::server_config`], for the accept loop.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, String> {
        Ok(TlsAcceptor::from(Arc::new(self.server_config()?)))
    }

    /// The cert domains as last read.
    pub fn domains(&self) -> Vec<String> {
        self.read().domains.clone()
    }

    /// The certificates held now, in `CertDomains` order.
    pub fn info(&self) -> Vec<CertInfo> {
        let st = self.read();
        st.domains
            .iter()
            .filter_map(|d| {
                st.certs.get(d).map(|l| CertInfo {
                    domain: d.clone(),
                    not_before: l.not_before,
                    not_after: l.not_after,
                })
            })
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, CertState> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Re-reads `CertDomains` and every certificate (asking tailscaled to renew those inside
    /// the renewal window). On failure the certificates held so far stay in use; the error
    /// says what failed. Succeeds when at least one certificate is held afterwards.
    pub async fn refresh(&self) -> Result<(), String> {
        let status = self
            .api
            .status()
            .await
            .map_err(|e| format!("cannot read tailscaled's status for HTTPS: {e}"))?;
        if status.cert_domains.is_empty() {
            let why = match status.backend_state {
                BackendState::Running => "HTTPS certificates are not enabled for this tailnet \
                    (tailscaled reports no cert domains). Enable MagicDNS and HTTPS \
                    Certificates in the admin console (DNS page), or set `tls: off` (e.g. \
                    behind `tailscale serve`)"
                    .to_owned(),
                ref state => format!(
                    "tailscaled is {state}, so it has no certificate for this node yet; bring \
                     the node up (`tailscale up`) first"
                ),
            };
            return Err(why);
        }
        let now = Utc::now();
        let mut errors = Vec::new();
        let mut fetched: Vec<(String, Loaded)> = Vec::new();
        for domain in &status.cert_domains {
            let current = self.read().certs.get(domain).cloned();
            let min_validity = current.as_ref().and_then(|l| self.renewal_due(l, now));
            if let Some(mv) = min_validity {
                tracing::info!(
                    domain,
                    not_after = %current.as_ref().map(|l| l.not_after.to_rfc3339()).unwrap_or_default(),
                    "TLS certificate is inside its renewal window; asking tailscaled to renew (min_validity {}s)",
                    mv.as_secs()
                );
            }
            match self.fetch(domain, min_validity).await {
                Ok(l) => {
                    let changed = current.as_ref().is_none_or(|c| c.not_after != l.not_after);
                    if changed {
                        tracing::info!(domain, not_after = %l.not_after.to_rfc3339(), "TLS certificate loaded from tailscaled");
                    }
                    fetched.push((domain.clone(), l));
                }
                Err(e) => errors.push(e),
            }
        }
        let mut st = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.domains = status.cert_domains.clone();
        let keep: Vec<String> = st.domains.clone();
        st.certs.retain(|d, _| keep.contains(d));
        for (d, l) in fetched {
            st.certs.insert(d, l);
        }
        let held = !st.certs.is_empty();
        drop(st);
        match (errors.is_empty(), held) {
            (true, _) => Ok(()),
            (false, true) => {
                for e in &errors {
                    tracing::warn!(
                        "TLS certificate refresh: {e} (the current certificate stays in use)"
                    );
                }
                Err(errors.join("; "))
            }
            (false, false) => Err(errors.join("; ")),
        }
    }

    /// `Some(min_validity)` when the certificate should be renewed now.
    fn renewal_due(&self, l: &Loaded, now: DateTime<Utc>) -> Option<Duration> {
        let lifetime = (l.not_after - l.not_before).to_std().unwrap_or_default();
        let window = self.settings.renew_before.unwrap_or(lifetime / 3);
        let left = (l.not_after - now).to_std().unwrap_or_default();
        (left < window).then(|| {
            // Whole seconds, at least a minute: what tailscaled's min_validity parses.
            Duration::from_secs(window.as_secs().max(60))
        })
    }

    async fn fetch(&self, domain: &str, min_validity: Option<Duration>) -> Result<Loaded, String> {
        let pair = self
            .api
            .cert_pair(domain, min_validity)
            .await
            .map_err(|e| explain_cert_error(domain, &e))?;
        parse_pair(&pair).map_err(|e| format!("the certificate tailscaled gave for {domain}: {e}"))
    }

    /// Refreshes every `check_every` (every `retry_after_failure` after a failure) until the
    /// certificates are dropped.
    pub fn spawn_renewal(self: &Arc<Self>) -> JoinHandle<()> {
        let weak: Weak<LocalApiCerts> = Arc::downgrade(self);
        let mut wait = self.settings.check_every;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(wait).await;
                let Some(me) = weak.upgrade() else { return };
                wait = match me.refresh().await {
                    Ok(()) => me.settings.check_every,
                    Err(e) => {
                        tracing::warn!("TLS certificate refresh failed (retrying): {e}");
                        me.settings.retry_after_failure
                    }
                };
            }
        })
    }
}

impl ResolvesServerCert for LocalApiCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let st = self.read();
        let sni = hello.server_name();
        let Some(domain) = expand_sni(&st.domains, sni) else {
            tracing::debug!(sni = ?sni, "TLS: no certificate for this server name");
            return None;
        };
        let key = st.certs.get(&domain).map(|l| l.key.clone());
        if key.is_none() {
            tracing::debug!(domain, "TLS: certificate not loaded");
        }
        key
    }
}

/// The cert domain for a ClientHello's SNI (`ExpandSNIName`): an FQDN must be one of
/// `domains` (case-insensitive, trailing dot ignored); a bare label picks the domain that
/// starts with it; no SNI picks the first domain.
pub fn expand_sni(domains: &[String], sni: Option<&str>) -> Option<String> {
    let name = sni
        .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
        .unwrap_or_default();
    if name.is_empty() {
        return domains.first().cloned();
    }
    if name.contains('.') {
        return domains
            .iter()
            .find(|d| d.eq_ignore_ascii_case(&name))
            .cloned();
    }
    domains
        .iter()
        .find(|d| {
            d.split_once('.')
                .is_some_and(|(first, _)| first.eq_ignore_ascii_case(&name))
        })
        .cloned()
}

/// The operator-facing reason a cert fetch failed, with tailscaled's message quoted.
pub fn explain_cert_error(domain: &str, e: &LocalApiError) -> String {
    match e {
        LocalApiError::AccessDenied { body, .. } => format!(
            "tailscaled refused the certificate for {domain} (403: {body:?}): fetching certs needs \
             LocalAPI write access. Run toolgate as root (or as tailscaled's user), or start \
             tailscaled with TS_PERMIT_CERT_UID=<toolgate's uid or user name>, or use `tls: off` \
             behind `tailscale serve`"
        ),
        LocalApiError::Status { code, body, .. } => {
            let hint = if body.contains("no netmap") {
                "the node is not connected to its tailnet yet"
            } else {
                "is HTTPS Certificates enabled for the tailnet (admin console, DNS page), with \
                 MagicDNS on?"
            };
            format!(
                "tailscaled could not provide the certificate for {domain} ({code}: {body:?}); {hint}"
            )
        }
        LocalApiError::NotFound { body, .. } => format!(
            "tailscaled has no cert endpoint ({body:?}); is it too old for HTTPS certificates?"
        ),
        LocalApiError::Timeout { timeout, .. } => format!(
            "tailscaled did not deliver the certificate for {domain} within {} s (the first \
             issuance goes through Let's Encrypt and needs tailscaled to reach the internet)",
            timeout.as_secs()
        ),
        other => format!("cannot fetch the certificate for {domain}: {other}"),
    }
}

/// Key and chain PEM → a rustls certified key (the key must match the leaf) and its validity.
fn parse_pair(pair: &CertPair) -> Result<Loaded, String> {
    let chain: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut pair.cert_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("certificate PEM: {e}"))?;
    let leaf = chain.first().ok_or("no certificate in the chain")?;
    let (not_before, not_after) = validity(leaf.as_ref())?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut pair.key_pem.as_bytes())
        .map_err(|e| format!("private key PEM: {e}"))?
        .ok_or("no private key")?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| format!("key and certificate: {e}"))?;
    Ok(Loaded {
        key: Arc::new(key),
        not_before,
        not_after,
    })
}

/// A certificate's validity period, from its DER (`Certificate.tbsCertificate.validity`).
pub fn validity(der: &[u8]) -> Result<(DateTime<Utc>, DateTime<Utc>), String> {
    let bad = |what: &str| format!("malformed certificate: {what}");
    let (cert, _) = der_tlv(der, 0x30).ok_or_else(|| bad("not a SEQUENCE"))?;
    let (mut tbs, _) = der_tlv(cert, 0x30).ok_or_else(|| bad("no tbsCertificate"))?;
    // [0] EXPLICIT version, optional.
    if tbs.first() == Some(&0xA0) {
        tbs = der_tlv(tbs, 0xA0).ok_or_else(|| bad("version"))?.1;
    }
    let (_, rest) = der_tlv(tbs, 0x02).ok_or_else(|| bad("serial number"))?;
    let (_, rest) = der_tlv(rest, 0x30).ok_or_else(|| bad("signature algorithm"))?;
    let (_, rest) = der_tlv(rest, 0x30).ok_or_else(|| bad("issuer"))?;
    let (validity, _) = der_tlv(rest, 0x30).ok_or_else(|| bad("validity"))?;
    let (nb, rest) = der_time(validity).ok_or_else(|| bad("notBefore"))?;
    let (na, _) = der_time(rest).ok_or_else(|| bad("notAfter"))?;
    Ok((nb, na))
}

/// One DER element with tag `tag` at the start of `b`: (its contents, what follows).
fn der_tlv(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *b.first()? != tag {
        return None;
    }
    let first = *b.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*b.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((b.get(header..end)?, b.get(end..)?))
}

/// A UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) element.
fn der_time(b: &[u8]) -> Option<(DateTime<Utc>, &[u8])> {
    let tag = *b.first()?;
    let (text, rest) = der_tlv(b, tag)?;
    let text = std::str::from_utf8(text).ok()?;
    let digits = text.strip_suffix('Z')?;
    if !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let num = |s: &str| s.parse::<u32>().ok();
    let (year, rest_digits) = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy = i32::try_from(num(digits.get(0..2)?)?).ok()?;
            (
                if yy >= 50 { 1900 + yy } else { 2000 + yy },
                digits.get(2..)?,
            )
        }
        (0x18, 14) => (
            i32::try_from(num(digits.get(0..4)?)?).ok()?,
            digits.get(4..)?,
        ),
        _ => return None,
    };
    let month = num(rest_digits.get(0..2)?)?;
    let day = num(rest_digits.get(2..4)?)?;
    let hour = num(rest_digits.get(4..6)?)?;
    let min = num(rest_digits.get(6..8)?)?;
    let sec = num(rest_digits.get(8..10)?)?;
    let naive = NaiveDate::from_ymd_opt(year, month, day)?.and_hms_opt(hour, min, sec)?;
    Some((Utc.from_utc_datetime(&naive), rest))
}

/// `tls: auto` in one call: loads the certificates, starts their renewal, and returns the
/// acceptor for the accept loop together with the certificate handle (for `doctor`, logs and
/// a refresh on netmap changes).
pub async fn acceptor(
    api: &LocalApi,
    settings: TlsSettings,
) -> Result<(TlsAcceptor, Arc<LocalApiCerts>), String> {
    let certs = LocalApiCerts::load(api, settings).await?;
    let acceptor = certs.acceptor()?;
    certs.spawn_renewal();
    Ok((acceptor, certs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domains() -> Vec<String> {
        vec![
            "toolgate.example.ts.net".into(),
            "svc.example.ts.net".into(),
        ]
    }

    #[test]
    fn sni_expansion() {
        let d = domains();
        assert_eq!(
            expand_sni(&d, Some("toolgate")).as_deref(),
            Some("toolgate.example.ts.net")
        );
        assert_eq!(
            expand_sni(&d, Some("SVC")).as_deref(),
            Some("svc.example.ts.net")
        );
        assert_eq!(
            expand_sni(&d, Some("Toolgate.Example.ts.net.")).as_deref(),
            Some("toolgate.example.ts.net")
        );
        assert_eq!(
            expand_sni(&d, None).as_deref(),
            Some("toolgate.example.ts.net")
        );
        assert_eq!(expand_sni(&d, Some("evil.example.com")), None);
        assert_eq!(
            expand_sni(&d, Some("toolgate.example.ts.net.evil.com")),
            None
        );
        assert_eq!(expand_sni(&d, Some("other")), None);
        assert_eq!(expand_sni(&[], Some("toolgate")), None);
    }

    #[test]
    fn der_times() {
        // UTCTime 261130021016Z, GeneralizedTime 21261106021016Z.
        let mut b = vec![0x17, 13];
        b.extend_from_slice(b"261130021016Z");
        let (t, rest) = der_time(&b).unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-30T02:10:16+00:00");
        assert!(rest.is_empty());
        let mut g = vec![0x18, 15];
        g.extend_from_slice(b"21261106021016Z");
        assert_eq!(
            der_time(&g).unwrap().0.to_rfc3339(),
            "2126-11-06T02:10:16+00:00"
        );
        let mut old = vec![0x17, 13];
        old.extend_from_slice(b"991231235959Z");
        assert_eq!(
            der_time(&old).unwrap().0.to_rfc3339(),
            "1999-12-31T23:59:59+00:00"
        );
        assert!(der_time(&[0x17, 3, b'1', b'2', b'Z']).is_none());
        assert!(der_tlv(&[0x30, 0x85, 1, 2, 3, 4, 5], 0x30).is_none());
        assert!(validity(b"garbage").is_err());
    }

    #[test]
    fn cert_errors_say_what_to_do() {
        let e = LocalApiError::AccessDenied {
            endpoint: "cert/x".into(),
            body: "cert access denied".into(),
        };
        let m = explain_cert_error("toolgate.example.ts.net", &e);
        assert!(m.contains("TS_PERMIT_CERT_UID"), "{m}");
        assert!(m.contains("\"cert access denied\""), "{m}");
        let e = LocalApiError::Status {
            endpoint: "cert/x".into(),
            code: 500,
            body: "acme: HTTPS not enabled".into(),
        };
        let m = explain_cert_error("toolgate.example.ts.net", &e);
        assert!(m.contains("HTTPS Certificates"), "{m}");
        assert!(m.contains("acme: HTTPS not enabled"), "{m}");
    }
}
