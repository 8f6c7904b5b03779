//! Everything `tessera serve` parses from clients and upstreams: manifests, paths and
//! queries, digests, Range and Content-Range headers, WWW-Authenticate challenges.
//! Invariants are checked in `tessera_registry::fuzzing::registry_inputs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tessera_registry::fuzzing::registry_inputs(data);
});
