//! Structured `Index::decode`: the fuzz bytes are the postcard body, wrapped in a valid
//! header ("TSRINDEX", version 1, body length) and a zstd frame, so every input reaches
//! postcard decoding and `Index::validate` instead of dying at the header or checksum.
//!
//! Invariants: never panics; the only possible errors are `Decode` and `Invalid`; an
//! accepted index round-trips canonically: `decode(encode(index)) == index`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_format::index::{Index, IndexError, INDEX_MAGIC, INDEX_VERSION};

fuzz_target!(|body: &[u8]| {
    let frame = zstd::bulk::compress(body, 1).expect("zstd compress");
    let mut bytes = Vec::with_capacity(20 + frame.len());
    bytes.extend_from_slice(INDEX_MAGIC);
    bytes.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&frame);

    match Index::decode(&bytes) {
        Ok(index) => {
            let encoded = index.encode().expect("encoding a decoded index");
            let again = Index::decode(&encoded).expect("re-decoding an encoded index");
            assert_eq!(again, index, "decode(encode(index)) != index");
            assert_eq!(
                again.encode().expect("encoding twice"),
                encoded,
                "encode is not deterministic"
            );
        }
        Err(IndexError::Decode(_) | IndexError::Invalid(_)) => {}
        Err(e) => panic!("a well-formed header and frame was rejected: {e}"),
    }
});
