//! A summary of a tessera image: files, chunks, unique bytes, packs, and dedup against
//! a chunk dictionary.

use crate::TesseraImage;
use serde::Serialize;
use std::collections::HashSet;
use tessera_format::index::Node;
use tessera_format::Digest;

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub manifest: String,
    pub subject: Option<String>,
    pub index_digest: String,
    pub index_bytes: u64,
    pub entries: u64,
    pub directories: u64,
    pub files: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub other: u64,
    /// Bytes of regular-file content (each inode once).
    pub file_bytes: u64,
    /// Chunk references of all files.
    pub chunk_refs: u64,
    /// Distinct chunks.
    pub chunks: u64,
    /// Uncompressed bytes of the distinct chunks.
    pub unique_bytes: u64,
    /// Stored (compressed) bytes of the distinct chunks.
    pub stored_bytes: u64,
    pub packs: Vec<PackSummary>,
    /// Index bytes per tree entry.
    pub index_bytes_per_entry: f64,
    pub dictionary: Option<DictSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PackSummary {
    pub digest: String,
    pub size: u64,
    /// Chunks of this image stored in the pack.
    pub chunks_used: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DictSummary {
    pub shared_chunks: u64,
    pub shared_bytes: u64,
    pub new_chunks: u64,
    pub new_bytes: u64,
}

pub fn summarize(img: &TesseraImage, dictionary: Option<&HashSet<Digest>>) -> Summary {
    let idx = &img.index;
    let (mut dirs, mut files, mut links, mut hard, mut other, mut refs) = (0, 0, 0, 0, 0, 0u64);
    for e in &idx.entries {
        match &e.node {
            Node::Dir(_) => dirs += 1,
            Node::File(_, f) => {
                files += 1;
                refs += f.chunks.len() as u64;
            }
            Node::Symlink(..) => links += 1,
            Node::HardLink(_) => hard += 1,
            _ => other += 1,
        }
    }
    let mut used = vec![0u64; idx.packs.len()];
    for c in &idx.chunks {
        used[c.pack as usize] += 1;
    }
    let packs = idx
        .packs
        .iter()
        .zip(used)
        .map(|(d, n)| PackSummary {
            digest: d.to_string(),
            size: img.packs.get(d).map(|p| p.size).unwrap_or(0),
            chunks_used: n,
        })
        .collect();
    let dictionary = dictionary.map(|dict| {
        let mut s = DictSummary {
            shared_chunks: 0,
            shared_bytes: 0,
            new_chunks: 0,
            new_bytes: 0,
        };
        for c in &idx.chunks {
            if dict.contains(&c.id) {
                s.shared_chunks += 1;
                s.shared_bytes += c.len as u64;
            } else {
                s.new_chunks += 1;
                s.new_bytes += c.len as u64;
            }
        }
        s
    });
    let entries = idx.entries.len() as u64;
    Summary {
        manifest: img.manifest_desc.digest.clone(),
        subject: img.manifest.subject.as_ref().map(|s| s.digest.clone()),
        index_digest: img.index_desc.digest.clone(),
        index_bytes: img.index_desc.size,
        entries,
        directories: dirs,
        files,
        symlinks: links,
        hardlinks: hard,
        other,
        file_bytes: idx.file_bytes(),
        chunk_refs: refs,
        chunks: idx.chunks.len() as u64,
        unique_bytes: idx.chunks.iter().map(|c| c.len as u64).sum(),
        // Each frame once, however many of the image's chunks it holds.
        stored_bytes: idx
            .chunks
            .iter()
            .map(|c| ((c.pack, c.offset), c.stored_len))
            .collect::<std::collections::HashMap<_, _>>()
            .values()
            .map(|&n| n as u64)
            .sum(),
        packs,
        index_bytes_per_entry: img.index_desc.size as f64 / entries.max(1) as f64,
        dictionary,
    }
}
