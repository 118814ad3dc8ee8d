//! Where log lines go and what they look like: a tracing subscriber on stderr.
//!
//! The format follows where stderr leads (`log.format` overrides it):
//! - the systemd journal (`JOURNAL_STREAM` names stderr's device and inode): plain text
//!   without ANSI codes; journald adds the time, unit and level colouring itself;
//! - a terminal: text with colours;
//! - anything else (a pipe, a file, a container's log collector): JSON, one object a line.
//!
//! `TOOLGATE_LOG` (a tracing filter) overrides `log.level`.

use crate::config::LogFormat;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    pub json: bool,
    /// ANSI colour codes (text only).
    pub ansi: bool,
}

/// The style for a configured format, given where stderr leads.
pub fn style(format: Option<LogFormat>, journald: bool, terminal: bool) -> Style {
    let ansi = terminal && !journald;
    match format {
        Some(LogFormat::Json) => Style { json: true, ansi },
        Some(LogFormat::Text) => Style { json: false, ansi },
        None if journald || terminal => Style { json: false, ansi },
        None => Style { json: true, ansi },
    }
}

/// Is stderr connected to the journal? systemd sets `JOURNAL_STREAM=DEV:INODE` for the
/// service's stderr stream; a child that inherited the variable but writes elsewhere must not
/// believe it, so the pair is compared with stderr's own (sd_journal_stream_fd(3)).
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    journal_stream_matches(&v, std::fs::metadata("/proc/self/fd/2").ok().as_ref())
}

fn journal_stream_matches(value: &str, stderr: Option<&std::fs::Metadata>) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    stderr.is_some_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Installs the subscriber (once per process; later calls do nothing).
pub fn init(format: Option<LogFormat>, level: Option<&str>) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOOLGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level.unwrap_or("info")))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let s = style(format, stderr_is_journal(), std::io::stderr().is_terminal());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(s.ansi);
    let _ = if s.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_follows_where_stderr_leads() {
        let text = |ansi| Style { json: false, ansi };
        let json = |ansi| Style { json: true, ansi };
        // (format, journald, terminal) → style
        assert_eq!(style(None, true, false), text(false));
        assert_eq!(style(None, true, true), text(false));
        assert_eq!(style(None, false, true), text(true));
        assert_eq!(style(None, false, false), json(false));
        assert_eq!(style(Some(LogFormat::Json), true, false), json(false));
        assert_eq!(style(Some(LogFormat::Text), false, false), text(false));
        assert_eq!(style(Some(LogFormat::Text), false, true), text(true));
    }

    #[test]
    fn journal_stream_must_name_stderr_itself() {
        use std::os::unix::fs::MetadataExt;
        let f = tempfile::NamedTempFile::new().unwrap();
        let m = std::fs::metadata(f.path()).unwrap();
        let mine = format!("{}:{}", m.dev(), m.ino());
        assert!(journal_stream_matches(&mine, Some(&m)));
        assert!(!journal_stream_matches(
            &format!("{}:{}", m.dev(), m.ino() + 1),
            Some(&m)
        ));
        assert!(!journal_stream_matches("garbage", Some(&m)));
        assert!(!journal_stream_matches(&mine, None));
    }
}
