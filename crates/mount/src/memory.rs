//! Chunks kept in memory for every mount of a process: one budget, shared.
//!
//! A FUSE read often covers part of a chunk the previous read also covered, and readahead
//! loads chunks here for a reader about to want them. Each mount used to keep 8 MiB of
//! its own, so a daemon serving ten images could hold 80 MiB of chunks; the budget is
//! now the process's ([`DEFAULT_BUDGET`]), and chunks are keyed by id, so images that
//! share a chunk share its copy.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tessera_format::Digest;

/// Bytes of chunks kept in memory by one process, all mounts together.
pub const DEFAULT_BUDGET: u64 = 16 << 20;

/// Verified chunks by id, oldest first out, bounded in bytes.
pub struct ChunkMemory {
    budget: u64,
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    map: HashMap<Digest, Arc<[u8]>>,
    order: VecDeque<Digest>,
    bytes: u64,
}

impl ChunkMemory {
    pub fn new(budget: u64) -> ChunkMemory {
        ChunkMemory {
            budget,
            inner: Mutex::new(Lru::default()),
        }
    }

    pub fn get(&self, id: &Digest) -> Option<Arc<[u8]>> {
        self.lock().map.get(id).cloned()
    }

    pub fn contains(&self, id: &Digest) -> bool {
        self.lock().map.contains_key(id)
    }

    /// Keep `data` (verified: its id is `id`), dropping the oldest chunks beyond the budget.
    pub fn put(&self, id: &Digest, data: &Arc<[u8]>) {
        let mut r = self.lock();
        if r.map.insert(*id, data.clone()).is_some() {
            return;
        }
        r.order.push_back(*id);
        r.bytes += data.len() as u64;
        while r.bytes > self.budget {
            let Some(old) = r.order.pop_front() else {
                break;
            };
            if let Some(d) = r.map.remove(&old) {
                r.bytes -= d.len() as u64;
            }
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
        assert!(!m.contains(&a.0), "the oldest chunk stayed past the budget");
        assert!(m.get(&d.0).is_some_and(|x| x[..] == d.1[..]));
        assert!(m.contains(&b.0) && m.contains(&c.0));
    }
}
