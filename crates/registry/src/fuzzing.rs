//! Entry points for the cargo-fuzz targets (fuzz/fuzz_targets/registry_inputs.rs): every
//! parser that sees bytes from a client or an upstream, with the invariants they keep.

use crate::api;
use crate::body::{parse_range, RangeReq};
use crate::manifest::parse_manifest;
use crate::routes::{parse_query, parse_route};
use axum::http::{HeaderMap, HeaderValue};
use tessera_format::media::{OCI_INDEX, OCI_MANIFEST};
use tessera_format::{Algorithm, OciDigest};
use tessera_oci::reference::{valid_repo, valid_tag};

/// Run every registry input parser on `data` and check their invariants (panics on a
/// broken invariant; returns normally on rejected input).
pub fn registry_inputs(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let d = OciDigest::of(Algorithm::Sha256, data);

    // Manifests, with and without a Content-Type.
    let index_with_params = format!("{OCI_INDEX}; charset=x");
    for ct in [None, Some(OCI_MANIFEST), Some(index_with_params.as_str())] {
        if let Ok(p) = parse_manifest(data, ct, &d) {
            // Whatever is accepted names only well-formed digests and is JSON.
            assert!(serde_json::from_slice::<serde_json::Value>(data).is_ok());
            for (r, _) in &p.required {
                assert!(OciDigest::parse(&r.to_string()).is_ok());
            }
            let _ = p.wants_twin();
        }
    }

    // Paths, queries, names, digests.
    if let Some(route) = parse_route(&text) {
        if let Some(repo) = route.repo() {
            let _ = valid_repo(repo);
        }
    }
    let _ = parse_query(Some(&text));
    let _ = valid_tag(&text);
    if let Ok(bd) = OciDigest::parse(&text) {
        assert_eq!(
            bd.to_string(),
            text,
            "an accepted digest re-prints as itself"
        );
    }

    // Range against every size up to a few bytes past the input, and a huge one.
    let size = data.len() as u64;
    for sz in [0, 1, size, size + 7, u64::MAX] {
        match parse_range(Some(&text), sz) {
            RangeReq::Part(a, b) => assert!(a <= b && b < sz, "range {a}-{b} outside {sz}"),
            RangeReq::Full | RangeReq::Unsatisfiable => {}
        }
    }

    // Content-Range of a chunk upload.
    if let Ok(v) = HeaderValue::from_bytes(data) {
        let mut h = HeaderMap::new();
        h.insert("content-range", v);
        if let Ok(Some((a, b))) = api::content_range(&h) {
            assert!(a <= b);
        }
    }

    // An upstream's WWW-Authenticate challenge.
    let _ = tessera_oci::auth::Challenge::parse(&text);

    // A bearer token a client sends, and the scopes of a token request: nothing
    // unsigned is ever accepted, and accepted scopes name valid repositories.
    let issuer =
        crate::token::TokenIssuer::with_key(&[9u8; 32], std::time::Duration::from_secs(60));
    assert!(
        issuer.verify(&text).is_err(),
        "an unsigned token was accepted"
    );
    if let Ok(scopes) = crate::token::parse_scopes([text.as_ref()]) {
        for s in scopes {
            assert!(valid_repo(&s.name));
        }
    }
}
