//! What a lazy mount parses that it did not write: read profiles stored in registries,
//! node-store pointers and sealed-file chunk lists. Invariants are checked in
//! `tessera_mount::fuzzing::mount_inputs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tessera_mount::fuzzing::mount_inputs(data);
});
