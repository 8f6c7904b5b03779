//! Chunks kept in memory for every mount of a process: one budget, shared.
//!
//! A FUSE read often covers part of a chunk the previous read also covered, and readahead
//! loads chunks here for a reader about to want them. Each mount used to keep 8 MiB of
//! its own, so a daemon serving ten images could hold 80 MiB of chunks; the budget is
//! now the process's ([`DEFAULT_BUDGET`]), and chunks are keyed by id, so images that
//! share a chunk share its copy.

use lru::LruCache;
use std::sync::{Arc, Mutex};
use tessera_format::Digest;

/// Bytes of chunks kept in memory by one process, all mounts together.
pub const DEFAULT_BUDGET: u64 = 16 << 20;

/// Verified chunks by id, least recently used first out, bounded in bytes.
pub struct ChunkMemory {
    budget: u64,
    inner: Mutex<Lru>,
}

struct Lru {
    map: LruCache<Digest, Arc<[u8]>>,
    bytes: u64,
}

impl ChunkMemory {
    pub fn new(budget: u64) -> ChunkMemory {
        ChunkMemory {
            budget,
            inner: Mutex::new(Lru {
                map: LruCache::unbounded(),
                bytes: 0,
            }),
        }
    }

    /// The chunk `id`, if held; a hit makes it the most recently used.
    pub fn get(&self, id: &Digest) -> Option<Arc<[u8]>> {
        self.lock().map.get(id).cloned()
    }

    /// Whether `id` is held (recency unchanged).
    pub fn contains(&self, id: &Digest) -> bool {
        self.lock().map.contains(id)
    }

    /// Keep `data` (verified: its id is `id`), dropping the least recently used chunks
    /// beyond the budget.
    pub fn put(&self, id: &Digest, data: &Arc<[u8]>) {
        let mut r = self.lock();
        if r.map.get(id).is_some() {
            return;
        }
        r.map.put(*id, data.clone());
        r.bytes += data.len() as u64;
        while r.bytes > self.budget {
            let Some((_, d)) = r.map.pop_lru() else {
                break;
            };
            r.bytes -= d.len() as u64;
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for ChunkMemory {
    fn default() -> Self {
        ChunkMemory::new(DEFAULT_BUDGET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_holds_across_images_and_shared_chunks_are_kept_once() {
        let m = ChunkMemory::new(3000);
        let chunk = |b: u8| -> (Digest, Arc<[u8]>) {
            let d: Arc<[u8]> = vec![b; 1000].into();
            (Digest::of(&d), d)
        };
        let (a, b, c, d) = (chunk(1), chunk(2), chunk(3), chunk(4));
        for (id, data) in [&a, &b, &c] {
            m.put(id, data);
        }
        // The same chunk from another image: no second copy.
        m.put(&a.0, &a.1);
        assert_eq!(m.bytes(), 3000);
        m.put(&d.0, &d.1);
        assert_eq!(m.bytes(), 3000);
        // `a` was put again (used again), so `b` is now the least recently used.
        assert!(!m.contains(&b.0), "the oldest chunk stayed past the budget");
        assert!(m.get(&d.0).is_some_and(|x| x[..] == d.1[..]));
        assert!(m.contains(&a.0) && m.contains(&c.0));
    }

    #[test]
    fn a_chunk_read_again_outlives_older_ones() {
        let m = ChunkMemory::new(3000);
        let chunk = |b: u8| -> (Digest, Arc<[u8]>) {
            let d: Arc<[u8]> = vec![b; 1000].into();
            (Digest::of(&d), d)
        };
        let (a, b, c, d) = (chunk(1), chunk(2), chunk(3), chunk(4));
        for (id, data) in [&a, &b, &c] {
            m.put(id, data);
        }
        assert!(m.get(&a.0).is_some());
        m.put(&d.0, &d.1);
        assert!(m.contains(&a.0), "a chunk just read was dropped first");
        assert!(!m.contains(&b.0));
        assert_eq!(m.bytes(), 3000);
    }
}
