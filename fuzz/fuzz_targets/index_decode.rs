//! `Index::decode` on raw untrusted bytes (header, zstd frame, postcard body, validation).
//!
//! Invariants: never panics, hangs or allocates without bound; anything it accepts
//! re-encodes to bytes that decode to the same index, and the accessors a reader uses
//! on a decoded index (paths, metadata, file maps) do not panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_format::index::{FileMap, Index, Node};

fuzz_target!(|data: &[u8]| {
    let Ok(index) = Index::decode(data) else {
        return;
    };
    let again = Index::decode(&index.encode().expect("encoding a decoded index"))
        .expect("re-decoding an encoded index");
    assert_eq!(again, index, "decode(encode(index)) != index");

    let _ = index.file_bytes();
    for i in 0..index.entries.len() {
        let _ = index.path(i);
        assert!(index.meta(i).is_some(), "entry {i} has no metadata");
        let inode = index.inode_entry(i);
        assert!(inode <= i, "entry {i} links forward to {inode}");
        if let Node::File(_, f) = &index.entries[i].node {
            let map = FileMap::new(&index, f);
            for off in [0, f.size / 2, f.size.saturating_sub(1), f.size] {
                if let Some((k, start)) = map.locate(off) {
                    assert!(k < f.chunks.len() && start <= off, "bad FileMap::locate({off})");
                } else {
                    assert!(off >= f.size, "FileMap::locate({off}) missed, size {}", f.size);
                }
            }
        }
    }
});
