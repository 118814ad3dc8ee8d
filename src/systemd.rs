//! systemd's service notifications (sd_notify(3)) for `Type=notify`: `READY=1` once the
//! listeners are bound and the policies are loaded, `STATUS=` saying what the daemon is doing
//! or waiting for, `RELOADING=1`/`READY=1` around a policy reload and `STOPPING=1` on the way
//! out. Without `NOTIFY_SOCKET` (not under systemd) every call does nothing.
//!
//! Messages go through the `sd-notify` crate. Status text comes partly from outside (tailscaled's
//! answers, file paths), so line breaks are replaced: one status can never add a second
//! assignment such as `READY=1`.

use sd_notify::NotifyState;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// `STATUS=`: what the daemon is doing or waiting for; it stays until the next one.
pub fn status(text: &str) {
    let text = one_line(text);
    send(&[NotifyState::Status(&text)]);
}

/// `READY=1` with a status: start-up (or a reload) is complete.
pub fn ready(text: &str) {
    let text = one_line(text);
    send(&[NotifyState::Ready, NotifyState::Status(&text)]);
}

/// `RELOADING=1` with the monotonic time systemd (v253+) wants beside it.
pub fn reloading(text: &str) {
    let text = one_line(text);
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status(&text)]),
        Err(_) => send(&[NotifyState::Status(&text)]),
    }
}

/// `STOPPING=1`: shutting down.
pub fn stopping(text: &str) {
    let text = one_line(text);
    send(&[NotifyState::Stopping, NotifyState::Status(&text)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_is_one_line() {
        assert_eq!(one_line("a\nREADY=1\r\tb"), "a READY=1  b");
    }
}
