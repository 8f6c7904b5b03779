//! Pack parsing on untrusted bytes: `verify_pack_bytes`, the streaming `verify_pack`, and
//! the pieces a Range-request reader uses on their own: `Footer::decode`, `decode_toc`,
//! `decode_chunk` (also with a fuzzer-chosen TOC entry and claimed pack size).
//!
//! Both pack versions: version 1 (one chunk per frame) and version 2 (frames of several
//! chunks).
//!
//! Invariants: never panics, hangs or allocates without bound; the in-memory and
//! streaming verifiers agree with each other and with the step-by-step path; accepted
//! footers and (version 2) TOC entries re-encode to exactly the bytes they were read from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use tessera_format::pack::{
    decode_chunk, decode_toc, verify_pack, verify_pack_bytes, Footer, TocEntry, FOOTER_LEN,
    TOC_ENTRY_LEN,
};
use tessera_format::Digest;

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}
fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

/// Footer -> TOC -> every frame, the way a remote reader does it.
fn step_by_step(pack: &[u8]) -> Option<Vec<TocEntry>> {
    let size = pack.len() as u64;
    let footer_bytes = &pack[pack.len().checked_sub(FOOTER_LEN)?..];
    let footer = Footer::decode(footer_bytes, size).ok()?;
    assert_eq!(&footer.encode()[..], footer_bytes, "footer does not re-encode");
    assert!(footer.toc_offset + footer.toc_len() + FOOTER_LEN as u64 == size);
    let toc = &pack[footer.toc_offset as usize..pack.len() - FOOTER_LEN];
    let entries = decode_toc(toc, &footer).ok()?;
    assert_eq!(entries.len() as u64, footer.entry_count);
    for (e, raw) in entries.iter().zip(toc.chunks_exact(footer.entry_len())) {
        if footer.version == 2 {
            assert_eq!(raw.len(), TOC_ENTRY_LEN);
            assert_eq!(&e.encode()[..], raw, "TOC entry does not re-encode");
        }
        let start = e.offset as usize;
        let stored = &pack[start..start + e.stored_len as usize];
        let data = decode_chunk(stored, e).ok()?;
        assert_eq!(data.len(), e.uncompressed_len as usize);
        assert_eq!(Digest::of(&data), e.id);
    }
    Some(entries)
}

fuzz_target!(|data: &[u8]| {
    let whole = verify_pack_bytes(data);
    let streamed = verify_pack(&mut Cursor::new(data));
    let steps = step_by_step(data);
    match (&whole, &streamed, &steps) {
        (Ok(a), Ok(b), Some(c)) => {
            assert_eq!(a, b, "verify_pack_bytes and verify_pack disagree");
            assert_eq!(a, c, "verify_pack_bytes and the step-by-step path disagree");
        }
        (Err(_), Err(_), None) => {}
        _ => panic!(
            "verifiers disagree: bytes ok={} streamed ok={} steps ok={}",
            whole.is_ok(),
            streamed.is_ok(),
            steps.is_some()
        ),
    }

    // Footer::decode against a claimed pack size that need not match the bytes
    // (a Range reader learns the size from Content-Range, i.e. from the server).
    if data.len() >= 8 + FOOTER_LEN {
        let claimed = le_u64(data);
        if let Ok(f) = Footer::decode(&data[8..8 + FOOTER_LEN], claimed) {
            let end = f.toc_offset.checked_add(f.toc_len()).and_then(|x| x.checked_add(40));
            assert_eq!(end, Some(claimed), "accepted footer does not tile the pack");
        }
    }

    // decode_chunk with a fuzzer-chosen TOC entry (as read from a hostile TOC by a caller
    // that skipped decode_toc) and the rest of the input as the stored frame.
    if data.len() >= 49 {
        let e = TocEntry {
            id: Digest(data[0..32].try_into().unwrap()),
            offset: 0,
            stored_len: le_u32(&data[32..36]),
            frame_len: le_u32(&data[36..40]) & 0x7_ffff, // up to 2 * MAX_FRAME
            inner: le_u32(&data[41..45]) & 0x7_ffff,
            uncompressed_len: le_u32(&data[44..48]) & 0x7_ffff,
            raw: data[48] & 1 != 0,
        };
        let stored = &data[49..];
        // Often make the lengths agree so the frame gets as far as zstd.
        let e = if data[40] & 1 == 0 {
            TocEntry { stored_len: stored.len() as u32, ..e }
        } else {
            e
        };
        if let Ok(d) = decode_chunk(stored, &e) {
            assert_eq!(Digest::of(&d), e.id);
        }
    }
});
