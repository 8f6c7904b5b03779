//! tessera extensions (docs/registry-api.md): packs are verified before a tessera
//! manifest is accepted, their chunks enter the global chunk index, and clients ask in
//! bulk which chunks the registry already holds.

use crate::backend::Backend;
use crate::config::Action;
use crate::error::{ApiError, Code, StoreError};
use crate::meta::ChunkHit;
use crate::state::{Registry, Shared};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::io::Read;
use tessera_format::index::Index;
use tessera_format::media::{ARTIFACT_TYPE, INDEX_MEDIA_TYPE, PACK_MEDIA_TYPE};
use tessera_format::pack;
use tessera_format::OciDigest;

/// Most chunk ids one query may carry.
pub const MAX_QUERY_IDS: usize = 100_000;
/// Largest query body (100000 ids of 71 bytes, with room for JSON spacing).
pub const MAX_QUERY_BYTES: usize = 16 << 20;

/// Chunk ids of a stored pack, from its table of contents.
pub fn pack_chunk_ids(backend: &dyn Backend, d: &OciDigest) -> Result<Vec<String>, StoreError> {
    let mut r = backend.open_seekable(d)?;
    let toc = pack::read_toc(&mut r).map_err(|e| StoreError::Corrupt(format!("pack {d}: {e}")))?;
    Ok(toc.iter().map(|e| e.id.hex()).collect())
}

impl Registry {
    /// Remove stored bytes nobody links any more (caller holds the write lock).
    pub(crate) fn remove_bytes(&self, d: &OciDigest) -> Result<(), StoreError> {
        let ds = d.to_string();
        if self.meta.pack_admitted(&ds)? {
            let ids = pack_chunk_ids(self.backend.as_ref(), d)?;
            self.meta.forget_pack(&ds, &ids)?;
        }
        self.backend.delete(d)?;
        Ok(())
    }

    /// Verify the packs and the index of a tessera manifest and admit the packs' chunks
    /// to the global chunk index. Runs before the manifest becomes visible; on any
    /// failure nothing is admitted.
    pub(crate) fn admit_tessera_layers(
        &self,
        layers: &[(String, OciDigest, u64)],
    ) -> Result<(), ApiError> {
        let reject = |what: String| {
            self.metrics.packs_rejected.inc();
            tracing::warn!(error = %what, "tessera image rejected");
            ApiError::new(Code::ManifestInvalid, what)
        };
        let mut admitted = Vec::new();
        let pack_digests: Vec<String> = layers
            .iter()
            .filter(|(mt, _, _)| mt == PACK_MEDIA_TYPE)
            .map(|(_, d, _)| d.to_string())
            .collect();
        // docs/format.md §5.1/§5.4: one index layer, and the packs are exactly its packs.
        let indexes = layers
            .iter()
            .filter(|(mt, _, _)| mt == INDEX_MEDIA_TYPE)
            .count();
        if indexes != 1 {
            return Err(reject(format!(
                "a tessera image (artifactType {ARTIFACT_TYPE} or {PACK_MEDIA_TYPE} layers) needs exactly one {INDEX_MEDIA_TYPE} layer; this manifest has {indexes}"
            )));
        }
        for (mt, d, _) in layers {
            if mt == INDEX_MEDIA_TYPE {
                let mut bytes = Vec::new();
                self.backend
                    .open(d, 0)?
                    .take(tessera_format::index::MAX_INDEX_BODY)
                    .read_to_end(&mut bytes)
                    .map_err(|e| StoreError::io(d, e))?;
                let index =
                    Index::decode(&bytes).map_err(|e| reject(format!("tessera index {d}: {e}")))?;
                let used: Vec<String> = index.packs.iter().map(|p| p.to_string()).collect();
                for ps in &used {
                    if !pack_digests.contains(ps) {
                        return Err(reject(format!(
                            "tessera index {d} uses pack {ps}, which is not a layer of the manifest"
                        )));
                    }
                }
                if let Some(extra) = pack_digests.iter().find(|p| !used.contains(p)) {
                    return Err(reject(format!(
                        "pack layer {extra} is not used by tessera index {d}: the manifest must list exactly the index's packs"
                    )));
                }
                continue;
            }
            if mt != PACK_MEDIA_TYPE || self.meta.pack_admitted(&d.to_string())? {
                continue;
            }
            let mut r = self.backend.open_seekable(d)?;
            let toc =
                pack::verify_pack(&mut r).map_err(|e| reject(format!("tessera pack {d}: {e}")))?;
            let hits: Vec<(String, ChunkHit)> = toc
                .iter()
                .map(|e| {
                    (
                        e.id.hex(),
                        ChunkHit {
                            pack: d.to_string(),
                            offset: e.offset,
                            stored_len: e.stored_len,
                            frame_len: e.frame_len,
                            inner: e.inner,
                            uncompressed_len: e.uncompressed_len,
                            flags: u32::from(e.raw),
                        },
                    )
                })
                .collect();
            admitted.push((d.to_string(), hits));
        }
        for (d, hits) in admitted {
            self.meta.admit_pack(&d, &hits)?;
            self.metrics.packs_verified.inc();
            tracing::info!(pack = %d, chunks = hits.len(), "pack verified and indexed");
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkQuery {
    /// Chunk ids: sha256 of the uncompressed chunk, as `sha256:<hex>` or bare hex.
    pub chunks: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ChunkLocation {
    /// The pack blob holding the chunk.
    pub pack: String,
    pub pack_size: u64,
    /// A repository the caller may pull the pack from (and mount it from).
    pub repository: String,
    /// The frame of the pack that holds the chunk (offset, stored and decoded lengths)
    /// and the chunk's offset in the decoded frame.
    pub offset: u64,
    pub stored_len: u32,
    pub frame_len: u32,
    pub inner: u32,
    pub uncompressed_len: u32,
    pub raw: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ChunkAnswer {
    /// One entry per queried id, in order: where the chunk is, or null.
    pub chunks: Vec<Option<ChunkLocation>>,
}

/// `POST /tessera/v1/chunks`: which of these chunks does the registry hold, and where.
pub async fn query_chunks(
    State(reg): State<Shared>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
    // A body over MAX_QUERY_BYTES (or one that broke off) gets an OCI JSON error too.
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Code::SizeInvalid
            } else {
                Code::Unsupported
            };
            return ApiError::new(
                code,
                format!(
                    "chunk query body unreadable (at most {MAX_QUERY_BYTES} bytes): {}",
                    e.body_text()
                ),
            )
            .status(e.status())
            .into_response();
        }
    };
    match answer(reg, headers, body).await {
        Ok(a) => Json(a).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn answer(
    reg: Shared,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<ChunkAnswer, ApiError> {
    if reg.auth.is_some() && !reg.may(&headers, None, Action::Pull) {
        return Err(reg.challenge(&headers, None));
    }
    let q: ChunkQuery = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            Code::Unsupported,
            format!("body must be {{\"chunks\": [\"sha256:<hex>\", ...]}}: {e}"),
        )
        .status(axum::http::StatusCode::BAD_REQUEST)
    })?;
    if q.chunks.len() > MAX_QUERY_IDS {
        return Err(ApiError::new(
            Code::SizeInvalid,
            format!("at most {MAX_QUERY_IDS} chunk ids per query; split the list"),
        ));
    }
    let mut ids = Vec::with_capacity(q.chunks.len());
    for c in &q.chunks {
        let hex = c.strip_prefix("sha256:").unwrap_or(c);
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ApiError::new(
                Code::DigestInvalid,
                format!("chunk id {c:?} is not a sha256 digest"),
            ));
        }
        ids.push(hex.to_string());
    }
    tokio::task::spawn_blocking(move || {
        let hits = reg.meta.chunks(&ids)?;
        let mut where_cache: std::collections::HashMap<String, Option<(String, u64)>> =
            Default::default();
        let mut out = Vec::with_capacity(hits.len());
        for hit in hits {
            let Some(h) = hit else {
                out.push(None);
                continue;
            };
            if !where_cache.contains_key(&h.pack) {
                let mut found = None;
                let d =
                    OciDigest::parse(&h.pack).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                for repo in reg.meta.repos_with_blob(&h.pack)? {
                    if reg.may(&headers, Some(&repo), Action::Pull) {
                        if let Some(size) = reg.meta.blob_in_repo(&repo, &d)? {
                            found = Some((repo, size));
                            break;
                        }
                    }
                }
                where_cache.insert(h.pack.clone(), found);
            }
            out.push(
                where_cache
                    .get(&h.pack)
                    .cloned()
                    .flatten()
                    .map(|(repository, pack_size)| ChunkLocation {
                        pack: h.pack.clone(),
                        pack_size,
                        repository,
                        offset: h.offset,
                        stored_len: h.stored_len,
                        frame_len: h.frame_len,
                        inner: h.inner,
                        uncompressed_len: h.uncompressed_len,
                        raw: h.flags & 1 == 1,
                    }),
            );
        }
        Ok(ChunkAnswer { chunks: out })
    })
    .await
    .map_err(ApiError::internal)?
}
