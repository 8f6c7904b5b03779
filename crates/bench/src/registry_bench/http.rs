//! A small HTTP/1.1 client over `std::net::TcpStream`: GET only, keep-alive, Content-Length,
//! chunked and read-until-close bodies, and a deadline that aborts a response mid-body.
//!
//! The load phase runs 32 of these against a server on the same 2-core machine, so the
//! client is kept as cheap as it can be: no async runtime, no copies besides the socket
//! reads into one reusable buffer.

use anyhow::{anyhow, bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How long a read may block before the deadline is checked again.
const POLL: Duration = Duration::from_millis(100);
/// No byte from the server for this long is an error.
const STALL: Duration = Duration::from_secs(120);

/// Head of a response.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How a request ended.
#[derive(Debug)]
pub enum Outcome {
    /// The whole response was read: head and body length.
    Done(Head, u64),
    /// The deadline passed before the response was complete; body bytes read so far.
    Aborted(u64),
}

enum Fill {
    Data,
    Eof,
    Deadline,
}

/// One keep-alive connection to `addr` (reconnects when the server closes it).
pub struct Client {
    addr: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    /// Connections opened (1 + reconnects).
    pub connects: u64,
}

impl Client {
    pub fn new(addr: &str) -> Client {
        Client {
            addr: addr.to_string(),
            stream: None,
            buf: vec![0; 256 << 10],
            pos: 0,
            len: 0,
            connects: 0,
        }
    }

    fn connect(&mut self) -> Result<()> {
        let s = TcpStream::connect(&self.addr).with_context(|| format!("connect {}", self.addr))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(POLL))?;
        self.stream = Some(s);
        self.pos = 0;
        self.len = 0;
        self.connects += 1;
        Ok(())
    }

    fn fill(&mut self, deadline: Option<Instant>) -> Result<Fill> {
        if self.pos == self.len {
            self.pos = 0;
            self.len = 0;
        }
        let stream = self.stream.as_mut().context("not connected")?;
        let started = Instant::now();
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(Fill::Deadline);
            }
            if self.len == self.buf.len() {
                // Compact: only reached while parsing a head larger than the free space.
                self.buf.copy_within(self.pos..self.len, 0);
                self.len -= self.pos;
                self.pos = 0;
                if self.len == self.buf.len() {
                    bail!("response head larger than {} bytes", self.buf.len());
                }
            }
            match stream.read(&mut self.buf[self.len..]) {
                Ok(0) => return Ok(Fill::Eof),
                Ok(n) => {
                    self.len += n;
                    return Ok(Fill::Data);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if started.elapsed() > STALL {
                        bail!("no response byte from {} for {:?}", self.addr, STALL);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading the response"),
            }
        }
    }

    /// GET `path` with extra `headers`; body bytes go to `sink` (in order). With a
    /// `deadline`, the response is abandoned (and the connection dropped) when it passes.
    pub fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        deadline: Option<Instant>,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<Outcome> {
        // A kept-alive connection the server has closed meanwhile fails before any
        // response byte: retry that once on a fresh connection.
        let fresh = self.stream.is_none();
        match self.get_once(path, headers, deadline, sink) {
            Err(e) if !fresh && e.downcast_ref::<Stale>().is_some() => {
                self.stream = None;
                self.get_once(path, headers, deadline, sink)
            }
            r => {
                if !matches!(r, Ok(Outcome::Done(..))) {
                    self.stream = None;
                }
                r
            }
        }
    }

    fn get_once(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        deadline: Option<Instant>,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<Outcome> {
        if self.stream.is_none() {
            self.connect()?;
        }
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: tessera-registry-bench\r\n",
            self.addr
        );
        for (k, v) in headers {
            req.push_str(k);
            req.push_str(": ");
            req.push_str(v);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        let stream = self.stream.as_mut().context("not connected")?;
        if let Err(e) = stream.write_all(req.as_bytes()) {
            return Err(anyhow::Error::new(Stale).context(e.to_string()));
        }

        // Head.
        let head_end = loop {
            if let Some(i) = find(&self.buf[self.pos..self.len], b"\r\n\r\n") {
                break self.pos + i + 4;
            }
            let filled = match self.fill(deadline) {
                Err(e) if self.pos == self.len && is_reset(&e) => return Err(anyhow!(Stale)),
                r => r?,
            };
            match filled {
                Fill::Data => {}
                Fill::Eof if self.pos == self.len => return Err(anyhow!(Stale)),
                Fill::Eof => bail!("connection closed in the middle of a response head"),
                Fill::Deadline => return Ok(Outcome::Aborted(0)),
            }
        };
        let text = std::str::from_utf8(&self.buf[self.pos..head_end - 4])
            .context("response head is not UTF-8")?;
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let mut hs = Vec::new();
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                hs.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        self.pos = head_end;
        let head = Head {
            status,
            headers: hs,
        };
        let close = head
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
            || version == "HTTP/1.0";
        let chunked = head
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let length: Option<u64> = match head.header("content-length") {
            Some(v) => Some(v.parse().with_context(|| format!("Content-Length {v:?}"))?),
            None => None,
        };
        let no_body = status == 204 || status == 304 || (100..200).contains(&status);

        let mut got = 0u64;
        if no_body {
        } else if chunked {
            loop {
                let line = match self.line(deadline)? {
                    Some(l) => l,
                    None => return Ok(Outcome::Aborted(got)),
                };
                let size_hex = line.split(';').next().unwrap_or_default().trim();
                let size = u64::from_str_radix(size_hex, 16)
                    .with_context(|| format!("bad chunk size {line:?}"))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    loop {
                        match self.line(deadline)? {
                            Some(l) if l.is_empty() => break,
                            Some(_) => {}
                            None => return Ok(Outcome::Aborted(got)),
                        }
                    }
                    break;
                }
                if !self.body(size, &mut got, deadline, sink)? {
                    return Ok(Outcome::Aborted(got));
                }
                match self.line(deadline)? {
                    Some(l) if l.is_empty() => {}
                    Some(l) => bail!("expected CRLF after a chunk, got {l:?}"),
                    None => return Ok(Outcome::Aborted(got)),
                }
            }
        } else if let Some(n) = length {
            if !self.body(n, &mut got, deadline, sink)? {
                return Ok(Outcome::Aborted(got));
            }
        } else {
            // Until the server closes the connection.
            loop {
                if self.pos < self.len {
                    sink(&self.buf[self.pos..self.len]);
                    got += (self.len - self.pos) as u64;
                    self.pos = self.len;
                }
                match self.fill(deadline)? {
                    Fill::Data => {}
                    Fill::Eof => break,
                    Fill::Deadline => return Ok(Outcome::Aborted(got)),
                }
            }
            self.stream = None;
        }
        if close {
            self.stream = None;
        }
        Ok(Outcome::Done(head, got))
    }

    /// Read exactly `n` body bytes into `sink`; false if the deadline passed first.
    fn body(
        &mut self,
        n: u64,
        got: &mut u64,
        deadline: Option<Instant>,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<bool> {
        let mut left = n;
        while left > 0 {
            if self.pos == self.len {
                match self.fill(deadline)? {
                    Fill::Data => {}
                    Fill::Eof => bail!("connection closed after {} of {n} body bytes", n - left),
                    Fill::Deadline => return Ok(false),
                }
            }
            let take = ((self.len - self.pos) as u64).min(left) as usize;
            sink(&self.buf[self.pos..self.pos + take]);
            self.pos += take;
            left -= take as u64;
            *got += take as u64;
        }
        Ok(true)
    }

    /// One CRLF-terminated line (without the CRLF); None if the deadline passed.
    fn line(&mut self, deadline: Option<Instant>) -> Result<Option<String>> {
        loop {
            if let Some(i) = find(&self.buf[self.pos..self.len], b"\r\n") {
                let l = String::from_utf8_lossy(&self.buf[self.pos..self.pos + i]).into_owned();
                self.pos += i + 2;
                return Ok(Some(l));
            }
            match self.fill(deadline)? {
                Fill::Data => {}
                Fill::Eof => bail!("connection closed in a chunked body"),
                Fill::Deadline => return Ok(None),
            }
        }
    }

    /// GET into memory; error unless the status is 2xx.
    pub fn get_bytes(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<(Head, Vec<u8>)> {
        let mut body = Vec::new();
        match self.get(path, headers, None, &mut |b| body.extend_from_slice(b))? {
            Outcome::Done(h, _) if (200..300).contains(&h.status) => Ok((h, body)),
            Outcome::Done(h, _) => bail!(
                "GET {path}: HTTP {}: {}",
                h.status,
                String::from_utf8_lossy(&body[..body.len().min(500)])
            ),
            Outcome::Aborted(_) => unreachable!("no deadline"),
        }
    }
}

/// The connection was closed before a response started (a stale keep-alive connection).
#[derive(Debug)]
struct Stale;

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection closed before the response")
    }
}

impl std::error::Error for Stale {}

fn is_reset(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|e| {
        matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
        )
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
