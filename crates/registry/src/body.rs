//! Blob bodies: `Range` requests and streaming a stored blob to a client.

use crate::state::Shared;
use axum::body::{Body, Bytes};
use std::io::Read;
use tessera_format::OciDigest;

/// A parsed `Range: bytes=...` request against a blob of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeReq {
    Full,
    Part(u64, u64),
    Unsatisfiable,
}

pub fn parse_range(h: Option<&str>, size: u64) -> RangeReq {
    let Some(spec) = h.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeReq::Full;
    };
    if spec.contains(',') {
        // Multiple ranges: a full reply is allowed.
        return RangeReq::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeReq::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| s.parse::<u64>().ok();
    match (a.is_empty(), b.is_empty()) {
        (true, false) => match num(b) {
            Some(0) | None => RangeReq::Unsatisfiable,
            Some(_) if size == 0 => RangeReq::Unsatisfiable,
            Some(n) => RangeReq::Part(size.saturating_sub(n), size - 1),
        },
        (false, true) => match num(a) {
            Some(s) if s < size => RangeReq::Part(s, size - 1),
            Some(_) => RangeReq::Unsatisfiable,
            None => RangeReq::Full,
        },
        (false, false) => match (num(a), num(b)) {
            (Some(s), Some(e)) if s <= e && s < size => RangeReq::Part(s, e.min(size - 1)),
            (Some(_), Some(_)) => RangeReq::Unsatisfiable,
            _ => RangeReq::Full,
        },
        (true, true) => RangeReq::Full,
    }
}

/// Stream `len` bytes of a blob from `offset`, read on a blocking thread.
pub fn blob_body(reg: &Shared, d: OciDigest, offset: u64, len: u64) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let backend = reg.backend.clone();
    let sent = reg.metrics.bytes_sent.clone();
    tokio::task::spawn_blocking(move || {
        let mut r = match backend.open(&d, offset) {
            Ok(r) => r.take(len),
            Err(e) => {
                tracing::error!(digest = %d, error = %e, "cannot open blob");
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                return;
            }
        };
        let mut left = len;
        while left > 0 {
            let mut buf = vec![0u8; left.min(256 << 10) as usize];
            match r.read(&mut buf) {
                Ok(0) => {
                    tracing::error!(digest = %d, "blob shorter than recorded");
                    let _ = tx.blocking_send(Err(std::io::Error::other("blob truncated")));
                    return;
                }
                Ok(n) => {
                    buf.truncate(n);
                    left -= n as u64;
                    sent.inc_by(n as u64);
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        return; // client went away
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_the_conformance_suite() {
        let p = |h: &str| parse_range(Some(h), 2048);
        assert_eq!(p("bytes=500-1499"), RangeReq::Part(500, 1499));
        assert_eq!(p("bytes=500-"), RangeReq::Part(500, 2047));
        assert_eq!(p("bytes=-500"), RangeReq::Part(1548, 2047));
        assert_eq!(p("bytes=2000-5000"), RangeReq::Part(2000, 2047));
        assert_eq!(p("bytes=500-0"), RangeReq::Unsatisfiable);
        assert_eq!(p("bytes=5000-10000"), RangeReq::Unsatisfiable);
        assert_eq!(p("bytes=-0"), RangeReq::Unsatisfiable);
        assert_eq!(p("bytes=-5000"), RangeReq::Part(0, 2047));
        assert_eq!(p("bytes=0-1,5-6"), RangeReq::Full);
        assert_eq!(parse_range(None, 10), RangeReq::Full);
        assert_eq!(parse_range(Some("bytes=0-"), 0), RangeReq::Unsatisfiable);
    }
}
