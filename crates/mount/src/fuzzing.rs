//! Entry point for the cargo-fuzz target `mount_inputs` (fuzz/fuzz_targets): the parsers
//! of a lazy mount that see bytes it did not write — read profiles (stored beside images
//! in registries), node-store pointers and chunk lists (files of a store that other
//! processes and shared tiers write).

use crate::store::{self, POINTER_LEN};

/// Run every mount input parser on `data`; panics on a broken invariant.
pub fn mount_inputs(data: &[u8]) {
    for line in data.split(|&b| b == b'\n') {
        let (range, path) = crate::parse_profile_line(line);
        // The path is always a suffix of the line; a range always comes with a path.
        assert!(line.ends_with(path));
        if range.is_some() {
            assert!(path.len() < line.len());
        } else {
            assert_eq!(path, line);
        }
    }
    if let Some(p) = store::Pointer::parse(data) {
        assert_eq!(data.len(), POINTER_LEN);
        assert_eq!(&p.encode()[..], data, "a pointer does not re-encode");
    }
    if let Some(list) = store::parse_chunk_list(data) {
        assert_eq!(list.len() * 36, data.len());
    }
}
