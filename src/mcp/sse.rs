//! Server-sent events, incrementally: bytes in, whole events out, without buffering a stream.
//!
//! Only what MCP uses is kept: `id`, `event`, `data` (joined with `\n`), `retry`. Comments and
//! unknown fields are dropped. Lines may end in `\n`, `\r\n` or `\r`. An event larger than the
//! limit is an error (a bounded stream, invariant I5).
//!
//! Each byte is looked at once while searching for line ends: the parser remembers how far it
//! has scanned the unfinished line, so an event that arrives in many chunks costs time linear in
//! its size (rescanning from the start on every chunk made one 8 MiB event in 4 KiB chunks take
//! seconds).

use bytes::{Bytes, BytesMut};

/// One event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
}

impl Event {
    /// The event as wire bytes.
    pub fn to_bytes(&self) -> Bytes {
        let mut s = String::with_capacity(self.data.len() + 32);
        if let Some(id) = &self.id {
            s.push_str("id: ");
            s.push_str(id);
            s.push('\n');
        }
        if let Some(e) = &self.event {
            s.push_str("event: ");
            s.push_str(e);
            s.push('\n');
        }
        if let Some(r) = self.retry {
            s.push_str(&format!("retry: {r}\n"));
        }
        if self.data.is_empty() {
            s.push_str("data: \n");
        } else {
            for line in self.data.split('\n') {
                s.push_str("data: ");
                s.push_str(line);
                s.push('\n');
            }
        }
        s.push('\n');
        Bytes::from(s)
    }
}

/// An incremental parser.
#[derive(Debug)]
pub struct Parser {
    buf: BytesMut,
    current: Event,
    has_fields: bool,
    data_lines: usize,
    max_event: usize,
    /// How much of `buf` holds no line end (scanned already; the next search starts here).
    scanned: usize,
    /// Bytes examined in line-end searches, over the parser's life (the linear-work test).
    examined: u64,
}

impl Parser {
    pub fn new(max_event: usize) -> Parser {
        Parser {
            buf: BytesMut::new(),
            current: Event::default(),
            has_fields: false,
            data_lines: 0,
            max_event,
            scanned: 0,
            examined: 0,
        }
    }

    /// Bytes examined so far while searching for line ends.
    pub fn examined(&self) -> u64 {
        self.examined
    }

    /// The next line end at or after `scanned`, remembering how far the search got.
    fn next_line_end(&mut self) -> Option<usize> {
        let from = self.scanned.min(self.buf.len());
        let found = self.buf[from..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r');
        let looked = found.map_or(self.buf.len() - from, |i| i + 1);
        self.examined += looked as u64;
        match found {
            Some(i) => Some(from + i),
            None => {
                self.scanned = self.buf.len();
                None
            }
        }
    }

    /// Feeds bytes; returns every event completed by them.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Event>, String> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = self.next_line_end() {
            // A lone `\r` at the very end may be half of `\r\n`: wait for more bytes (and
            // look at it again then).
            if self.buf[end] == b'\r' && end + 1 == self.buf.len() {
                self.scanned = end;
                break;
            }
            self.scanned = 0;
            let line = self.buf.split_to(end);
            let skip = if self.buf[0] == b'\r' && self.buf.get(1) == Some(&b'\n') {
                2
            } else {
                1
            };
            let _ = self.buf.split_to(skip);
            let line =
                std::str::from_utf8(&line).map_err(|_| "SSE line is not UTF-8".to_string())?;
            if let Some(ev) = self.line(line)? {
                out.push(ev);
            }
        }
        if self.buf.len() + self.current.data.len() > self.max_event {
            return Err(format!("SSE event larger than {} bytes", self.max_event));
        }
        Ok(out)
    }

    fn line(&mut self, line: &str) -> Result<Option<Event>, String> {
        if line.is_empty() {
            if !self.has_fields {
                return Ok(None);
            }
            self.has_fields = false;
            self.data_lines = 0;
            return Ok(Some(std::mem::take(&mut self.current)));
        }
        if line.starts_with(':') {
            return Ok(None);
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.data_lines > 0 {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.data_lines += 1;
            }
            "event" => self.current.event = Some(value.to_string()),
            "id" => self.current.id = Some(value.to_string()),
            "retry" => self.current.retry = value.parse().ok(),
            _ => return Ok(None),
        }
        self.has_fields = true;
        if self.current.data.len() > self.max_event {
            return Err(format!("SSE event larger than {} bytes", self.max_event));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_across_chunk_boundaries() {
        let wire = b"id: 1\r\ndata: \r\n\r\n: comment\nevent: message\ndata: {\"a\":\ndata: 1}\n\nretry: 5\ndata: x\r\r";
        for split in 0..wire.len() {
            let mut p = Parser::new(1024);
            let mut got = p.feed(&wire[..split]).unwrap();
            got.extend(p.feed(&wire[split..]).unwrap());
            got.extend(p.feed(b"\n").unwrap());
            assert_eq!(got.len(), 3, "split at {split}: {got:?}");
            assert_eq!(
                got[0],
                Event {
                    id: Some("1".into()),
                    data: String::new(),
                    ..Default::default()
                }
            );
            assert_eq!(got[1].event.as_deref(), Some("message"));
            assert_eq!(got[1].data, "{\"a\":\n1}");
            assert_eq!(got[2].retry, Some(5));
        }
    }

    #[test]
    fn bounded_and_round_trips() {
        let mut p = Parser::new(16);
        assert!(p.feed(b"data: 0123456789012345678901234567890\n").is_err());
        let ev = Event {
            id: Some("7".into()),
            event: Some("message".into()),
            data: "a\nb".into(),
            retry: None,
        };
        let mut p = Parser::new(1024);
        assert_eq!(p.feed(&ev.to_bytes()).unwrap(), vec![ev]);
    }

    /// One 8 MiB event in 4 KiB chunks: every byte is examined about once while looking for
    /// line ends (the old parser rescanned the whole buffer per chunk: ~1 GiB examined here).
    #[test]
    fn a_large_event_in_small_chunks_is_scanned_once() {
        const SIZE: usize = 8 << 20;
        let mut wire = Vec::with_capacity(SIZE + 16);
        wire.extend_from_slice(b"data: ");
        wire.resize(SIZE, b'x');
        wire.extend_from_slice(b"\r\n\r\n");
        let mut p = Parser::new(SIZE + 16);
        let mut got = Vec::new();
        for chunk in wire.chunks(4096) {
            got.extend(p.feed(chunk).unwrap());
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data.len(), SIZE - 6);
        let examined = p.examined();
        assert!(
            examined <= wire.len() as u64 + 16,
            "{examined} bytes examined for a {} byte stream",
            wire.len()
        );
    }
}
