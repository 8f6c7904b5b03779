//! Getting chunks for reads: from a small in-memory cache of recent chunks, from the
//! node store, else from the image's store (a registry) by range reads.
//!
//! * One fetch per chunk however many readers want it: the first reader registers a
//!   flight for the chunk, later readers wait on it (bounded).
//! * Neighbouring chunks of one pack that are fetched together go in one range request.
//! * A failing request is retried with exponential backoff until `max_wait` has passed;
//!   then the chunks fail, and the read that wanted them gets EIO. The next read tries
//!   again, so the mount recovers when the registry returns.
//! * Every fetched chunk is verified (sha256 of the decoded bytes) before it is used or
//!   cached. A chunk that fails is counted, logged and never stored or served.
//! * Background work (readahead within a file, prefetch of a profile or of the whole
//!   image) is queued for a few worker threads; readahead before prefetch, and prefetch
//!   on one worker only, so it does not crowd out the reads a program is waiting for.
//! * Large files whose chunks are all here are sealed (written out whole, see
//!   [`NodeStore::seal`]) by one background thread, so later opens can be passed
//!   through to the kernel.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tessera_format::pack::{check_location, chunk_in_frame, decode_frame};
use tessera_image::TesseraImage;
use tessera_oci::{OciError, RangeRead, Store};

use crate::store::{file_key, NodeStore, Sealed};

/// Fetched chunks waiting for the node store writer, at most.
const MAX_PENDING_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// How long a read may wait for its chunks (retries included) before it fails.
    pub max_wait: Duration,
    /// Bytes read ahead of a sequential reader, in the background.
    pub readahead: u64,
    /// Background fetch threads.
    pub workers: usize,
    /// Largest coalesced range request.
    pub max_range: u64,
    /// A read that must go to the registry also fetches the chunks that follow in the
    /// same pack (packs follow tree order: neighbouring files), up to this many bytes —
    /// only while range requests run at `amplify_min_rate` bytes/s or more: on a slow link
    /// the neighbours cost more than the round trips they save. Readahead from the
    /// registry (not from the node store) also waits for a fast link.
    pub amplify: u64,
    pub amplify_min_rate: f64,
    /// The registry's speed as first guessed (bytes/s): the index download (a shaper's
    /// burst can make it look fast; the range requests correct it, see [`LINK_SAMPLE`]).
    /// None: unknown, treated as slow until a busy period of requests carries a sample.
    pub link_rate: Option<f64>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            max_wait: Duration::from_secs(30),
            readahead: 4 << 20,
            workers: 4,
            max_range: 4 << 20,
            amplify: 128 << 10,
            amplify_min_rate: 32e6,
            link_rate: None,
        }
    }
}

/// Counters of one image's fetcher.
#[derive(Debug, Default)]
pub struct FetchStats {
    pub chunks_from_memory: AtomicU64,
    pub chunks_from_store: AtomicU64,
    pub chunks_fetched: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub range_requests: AtomicU64,
    pub retries: AtomicU64,
    pub fetch_errors: AtomicU64,
    pub verification_failures: AtomicU64,
    /// Chunks a reader got by waiting for another reader's fetch.
    pub shared_waits: AtomicU64,
    pub prefetched_chunks: AtomicU64,
    /// Files written out whole into the node store, and their bytes.
    pub sealed_files: AtomicU64,
    pub sealed_bytes: AtomicU64,
    /// Opens answered with a sealed file the kernel reads directly.
    pub passthrough_opens: AtomicU64,
    /// Sealed files that did not match their chunk lists when checked before a
    /// passthrough open (removed; that open went through the daemon).
    pub sealed_verify_failures: AtomicU64,
}

impl FetchStats {
    pub fn to_json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "chunks_from_memory": g(&self.chunks_from_memory),
            "chunks_from_store": g(&self.chunks_from_store),
            "chunks_fetched": g(&self.chunks_fetched),
            "bytes_fetched": g(&self.bytes_fetched),
            "range_requests": g(&self.range_requests),
            "retries": g(&self.retries),
            "fetch_errors": g(&self.fetch_errors),
            "verification_failures": g(&self.verification_failures),
            "shared_waits": g(&self.shared_waits),
            "prefetched_chunks": g(&self.prefetched_chunks),
            "sealed_files": g(&self.sealed_files),
            "sealed_bytes": g(&self.sealed_bytes),
            "passthrough_opens": g(&self.passthrough_opens),
            "sealed_verify_failures": g(&self.sealed_verify_failures),
        })
    }
}

/// Why a chunk could not be had.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The registry did not answer in time (after retries).
    Unavailable(String),
    /// The bytes did not match the chunk id.
    Corrupt(String),
}

type Outcome = Result<Arc<[u8]>, Failure>;

/// What [`Fetcher::on_link_change`] calls with the new verdict (true: fast).
pub type LinkHook = Box<dyn Fn(bool) + Send + Sync>;

#[derive(Default)]
struct Flight {
    result: Mutex<Option<Outcome>>,
    done: Condvar,
}

/// Bytes one busy period must carry before its rate says anything about the link. A
/// token-bucket shaper lets its burst through at line rate, so a shorter sample measures
/// the burst: with a 1 MB burst, a 0.5 MB index made a 12 MB/s link look like 44–202 MB/s.
/// 4 MiB past a 1 MB burst on a 12.5 MB/s link measure 17 MB/s (slow, as it is); a longer
/// burst still fools the first sample, but the rate is measured again with every request
/// of the period and falls as the period runs past the burst.
pub const LINK_SAMPLE: u64 = 4 << 20;

/// Idle time between two requests that still counts as one busy period: a reader that
/// waits for each chunk before asking for the next leaves such gaps, and a shaper refills
/// little of its burst in them. A longer gap starts a new sample (and may have refilled
/// the burst).
const LINK_GAP: Duration = Duration::from_millis(10);

/// Requests of at most this many bytes estimate the round trip (their transfer time is
/// small against it).
const LINK_SMALL: u64 = 32 << 10;

/// One range request in flight: when it started, and how many were in flight with it.
#[derive(Clone, Copy)]
struct InFlight {
    at: Instant,
    with: u32,
}

/// The registry link's bandwidth, measured from the range requests themselves.
///
/// A request's time is a round trip plus its transfer, and its transfer shares the link
/// with the requests in flight beside it. So each request counts for `(duration - rtt)
/// / concurrency` of transfer time, where `rtt` is the shortest time of a small request
/// seen (0 until one is seen: an underestimate of the bandwidth, corrected later).
/// Round trips then do not pass for a slow link (a distant registry answering small
/// requests), nor the client's own CPU for a fast one. Samples are per busy period of
/// [`LINK_SAMPLE`] bytes or more, past a shaper's burst; the short pauses inside a period
/// count as transfer time (a shaper refills its burst in them).
#[derive(Default)]
struct LinkMeter {
    in_flight: u32,
    busy_since: Option<Instant>,
    busy: Duration,
    bytes: u64,
    rtt: Option<Duration>,
    /// The current busy period: its bytes and their transfer time (seconds), and when
    /// its last request ended.
    period: Option<(u64, f64)>,
    last_end: Option<Instant>,
}

impl LinkMeter {
    fn start(&mut self, now: Instant) -> InFlight {
        if self.in_flight == 0 {
            self.busy_since = Some(now);
            let gap = self.last_end.map(|e| now.saturating_duration_since(e));
            match gap {
                // A short pause joins the period and counts as transfer time: a shaper
                // refills its burst meanwhile, and those bytes come at line rate.
                Some(g) if g <= LINK_GAP => {
                    if let Some((_, t)) = &mut self.period {
                        *t += g.as_secs_f64();
                    }
                }
                _ => self.period = None,
            }
        }
        self.in_flight += 1;
        InFlight {
            at: now,
            with: self.in_flight,
        }
    }

    /// A request ended with `bytes`; the current busy period's bandwidth once it has
    /// carried [`LINK_SAMPLE`] bytes (a verdict on the link), None before.
    fn end(&mut self, req: InFlight, bytes: u64, now: Instant) -> Option<f64> {
        let took = now.saturating_duration_since(req.at);
        // Requests in flight beside this one, itself included: the mean of its start and
        // its end (the largest would overrate a request that ran alone at the end).
        let with = (req.with.max(1) + self.in_flight.max(1)) as f64 / 2.0;
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.in_flight == 0 {
            if let Some(t) = self.busy_since.take() {
                self.busy += now.saturating_duration_since(t);
            }
            self.last_end = Some(now);
        }
        if bytes == 0 {
            return None;
        }
        self.bytes += bytes;
        if bytes <= LINK_SMALL && with <= 1.0 {
            self.rtt = Some(self.rtt.map_or(took, |r| r.min(took)));
        }
        let transfer = took
            .saturating_sub(self.rtt.unwrap_or_default())
            .as_secs_f64()
            / with;
        let (b, t) = self.period.get_or_insert((0, 0.0));
        *b += bytes;
        *t += transfer;
        (*b >= LINK_SAMPLE).then(|| *b as f64 / t.max(1e-6))
    }

    /// Bytes/s over all busy time, once at least 1 MiB was received (reported only).
    fn rate(&self, now: Instant) -> Option<f64> {
        let busy = self.busy
            + self
                .busy_since
                .map(|t| now.saturating_duration_since(t))
                .unwrap_or_default();
        (self.bytes >= 1 << 20).then(|| self.bytes as f64 / busy.as_secs_f64().max(1e-6))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Readahead: soon wanted by a reader (also loads node-store chunks into memory).
    High,
    /// A recorded profile: what the workload read last time, in that order.
    Profile,
    /// Prefetch of the whole image: wanted some time; one worker only.
    Low,
}

/// Files (entry numbers) waiting to be sealed.
#[derive(Default)]
struct SealQueue {
    todo: VecDeque<u32>,
    queued: HashSet<u32>,
    busy: bool,
    closed: bool,
}

#[derive(Default)]
struct Queue {
    high: VecDeque<Vec<u32>>,
    profile: VecDeque<Vec<u32>>,
    low: VecDeque<Vec<u32>>,
    closed: bool,
}

/// The latest frame decoded while splitting a fetched range: the chunks of one frame
/// decode it once.
#[derive(Default)]
struct FrameCache {
    /// (pack, frame offset) and the decoded frame, or why it did not decode.
    last: Option<(FrameKey, Result<Vec<u8>, String>)>,
}

/// A frame: (pack, offset in the pack).
type FrameKey = (u32, u64);

impl FrameCache {
    /// The verified bytes of chunk `loc` whose frame's stored bytes are `stored`.
    fn chunk(
        &mut self,
        loc: &tessera_format::index::ChunkLoc,
        stored: Option<&[u8]>,
    ) -> Result<Vec<u8>, String> {
        let key = (loc.pack, loc.offset);
        if self.last.as_ref().is_none_or(|(k, _)| *k != key) {
            let decoded = stored
                .ok_or_else(|| "short range".to_string())
                .and_then(|b| {
                    check_location(&loc.frame(), loc.inner, loc.len)?;
                    decode_frame(b, &loc.frame())
                });
            self.last = Some((key, decoded));
        }
        match &self.last {
            Some((_, Ok(plain))) => chunk_in_frame(plain, &loc.id, loc.inner, loc.len),
            Some((_, Err(e))) => Err(e.clone()),
            None => Err("no frame".into()),
        }
    }
}

pub struct Fetcher {
    /// Verified chunks on their way into the node store (served from here meanwhile).
    pending: Mutex<HashMap<u32, Arc<[u8]>>>,
    pending_bytes: AtomicU64,
    writer: Mutex<Option<std::sync::mpsc::Sender<u32>>>,
    image: Arc<TesseraImage>,
    source: Box<dyn Store>,
    store: Arc<NodeStore>,
    opts: FetchOptions,
    flights: Mutex<HashMap<u32, Arc<Flight>>>,
    /// Chunk ids in pack order, and each chunk's position in it (for amplification).
    pack_order: Vec<u32>,
    pack_pos: Vec<u32>,
    queue: Mutex<Queue>,
    queued: Condvar,
    /// How fast the registry delivers while it is busy with our requests.
    link: Mutex<LinkMeter>,
    /// The link's verdict: fast (`amplify_min_rate` or more over the latest sample).
    link_fast: AtomicBool,
    /// Told of each change of the verdict (the mount sets the kernel's readahead).
    on_link: Mutex<Option<LinkHook>>,
    /// Workers between taking a job and finishing it.
    busy: std::sync::atomic::AtomicUsize,
    seals: Mutex<SealQueue>,
    sealing: Condvar,
    /// The registry ignores `Range` (it answered a range request with the whole blob):
    /// packs are then fetched whole, once each, into the node store.
    whole_packs: AtomicBool,
    /// Per pack, held while it is fetched whole; true once it was.
    pack_loads: Mutex<HashMap<u32, Arc<Mutex<bool>>>>,
    pub stats: FetchStats,
}

/// What a fetch of a run of neighbouring chunks got.
enum Got {
    /// The bytes of the run, as stored (to decode and verify).
    Range(Vec<u8>),
    /// The run's chunks, decoded and verified, from a whole pack.
    Chunks(HashMap<u32, Outcome>),
}

/// Chunks of a pack fetched whole are written to the node store in batches of this many
/// bytes.
const WHOLE_PACK_BATCH: usize = 8 << 20;

/// A file's chunks as a sealed file lists them: (id, length), in order; None if the
/// index names a chunk it does not have.
pub(crate) fn sealed_list(
    index: &tessera_format::index::Index,
    f: &tessera_format::index::FileData,
) -> Option<Vec<(tessera_format::Digest, u32)>> {
    f.chunks
        .iter()
        .map(|&c| index.chunks.get(c as usize).map(|l| (l.id, l.len)))
        .collect()
}

fn retriable(e: &OciError) -> bool {
    matches!(
        e,
        OciError::Http(_) | OciError::Registry(_) | OciError::Io { .. }
    )
}

impl Fetcher {
    /// A fetcher with its background workers running (stopped by [`Fetcher::close`]).
    pub fn start(
        image: Arc<TesseraImage>,
        source: Box<dyn Store>,
        store: Arc<NodeStore>,
        opts: FetchOptions,
    ) -> Arc<Fetcher> {
        let workers = opts.workers;
        let fast = opts.link_rate.is_some_and(|r| r >= opts.amplify_min_rate);
        let (tx, rx) = std::sync::mpsc::channel::<u32>();
        let mut pack_order: Vec<u32> = (0..image.index.chunks.len() as u32).collect();
        pack_order.sort_by_key(|&c| {
            let l = &image.index.chunks[c as usize];
            (l.pack, l.offset, l.inner)
        });
        let mut pack_pos = vec![0u32; pack_order.len()];
        for (p, &c) in pack_order.iter().enumerate() {
            pack_pos[c as usize] = p as u32;
        }
        let f = Arc::new(Fetcher {
            pending: Mutex::new(HashMap::new()),
            pending_bytes: AtomicU64::new(0),
            writer: Mutex::new(Some(tx)),
            image,
            source,
            store,
            opts,
            flights: Mutex::new(HashMap::new()),
            pack_order,
            pack_pos,
            queue: Mutex::new(Queue::default()),
            queued: Condvar::new(),
            busy: std::sync::atomic::AtomicUsize::new(0),
            link: Mutex::new(LinkMeter::default()),
            link_fast: AtomicBool::new(fast),
            on_link: Mutex::new(None),
            seals: Mutex::new(SealQueue::default()),
            sealing: Condvar::new(),
            whole_packs: AtomicBool::new(false),
            pack_loads: Mutex::new(HashMap::new()),
            stats: FetchStats::default(),
        });
        {
            let me = f.clone();
            let spawned = std::thread::Builder::new()
                .name("tessera-seal".into())
                .spawn(move || me.sealer());
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the sealer; every read goes through the daemon");
                f.seals.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
            }
        }
        {
            let me = f.clone();
            let spawned = std::thread::Builder::new()
                .name("tessera-store-writer".into())
                .spawn(move || me.write_behind(rx));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the node store writer; chunks are not cached");
                *f.writer.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
        for n in 0..workers {
            let me = f.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("tessera-fetch-{n}"))
                .spawn(move || me.worker(n == 0));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a background fetch thread");
            }
        }
        f
    }

    pub fn image(&self) -> &TesseraImage {
        &self.image
    }

    pub fn store(&self) -> &NodeStore {
        &self.store
    }

    /// Seal file entry `i` in the background once all its chunks are here (a file with
    /// a chunk missing is skipped: sealing never fetches).
    pub fn request_seal(&self, i: u32) {
        let mut q = self.seals.lock().unwrap_or_else(|e| e.into_inner());
        if q.closed || !q.queued.insert(i) {
            return;
        }
        q.todo.push_back(i);
        self.sealing.notify_all();
    }

    fn sealer(self: Arc<Self>) {
        loop {
            let i = {
                let mut q = self.seals.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if q.closed {
                        return;
                    }
                    if let Some(i) = q.todo.pop_front() {
                        q.busy = true;
                        break i;
                    }
                    q = self.sealing.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            self.seal(i as usize);
            let mut q = self.seals.lock().unwrap_or_else(|e| e.into_inner());
            q.busy = false;
            q.queued.remove(&i);
            self.sealing.notify_all();
        }
    }

    /// A chunk held in memory (being cached, or recently used).
    fn in_memory(&self, c: u32) -> Option<Arc<[u8]>> {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&c)
            .cloned();
        pending.or_else(|| self.recent(c))
    }

    fn seal(&self, i: usize) {
        let index = &self.image.index;
        let Some(tessera_format::index::Node::File(_, f)) = index.entries.get(i).map(|e| &e.node)
        else {
            return;
        };
        let Some(list) = sealed_list(index, f) else {
            return;
        };
        let key = file_key(list.iter().map(|(id, _)| id));
        if self.store.has_sealed(&key) {
            return;
        }
        // Cheap check first: every chunk in memory or in the store.
        let all_here = f.chunks.iter().all(|&c| {
            self.in_memory(c).is_some() || self.store.contains(&index.chunks[c as usize].id)
        });
        if !all_here {
            return;
        }
        match self
            .store
            .seal(&key, &list, &|k| self.in_memory(f.chunks[k]))
        {
            Ok(Sealed::Written { bytes, pointers }) => {
                self.stats.sealed_files.fetch_add(1, Ordering::Relaxed);
                self.stats.sealed_bytes.fetch_add(bytes, Ordering::Relaxed);
                tracing::debug!(entry = i, %key, bytes, pointers, "sealed a file for passthrough");
            }
            Ok(Sealed::Present | Sealed::Missing) => {}
            Err(e) => {
                tracing::warn!(entry = i, error = %e, "cannot seal a file into the node store")
            }
        }
    }

    /// Wait (bounded) until the sealer has nothing left to do.
    fn drain_seals(&self, max: Duration) {
        let deadline = Instant::now() + max;
        let mut q = self.seals.lock().unwrap_or_else(|e| e.into_inner());
        while !q.closed && (q.busy || !q.todo.is_empty()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            q = self
                .sealing
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Persist fetched chunks in batches (one filesystem sync per batch), so a reader
    /// never waits for the disk.
    fn write_behind(self: Arc<Self>, rx: std::sync::mpsc::Receiver<u32>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < 256 {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let datas: Vec<(u32, Arc<[u8]>)> = {
                let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                batch
                    .iter()
                    .filter_map(|c| p.get(c).map(|d| (*c, d.clone())))
                    .collect()
            };
            let items: Vec<_> = datas
                .iter()
                .map(|(c, d)| (self.image.index.chunks[*c as usize].id, &d[..]))
                .collect();
            if let Err(e) = self.store.put_many(&items) {
                tracing::warn!(error = %e, chunks = items.len(), "cannot cache chunks in the node store");
            }
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for c in batch {
                if let Some(d) = p.remove(&c) {
                    self.pending_bytes
                        .fetch_sub(d.len() as u64, Ordering::Relaxed);
                }
            }
        }
    }

    /// Wait (bounded) until every fetched chunk is in the node store.
    pub fn flush(&self, max: Duration) {
        let start = Instant::now();
        while !self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
            && start.elapsed() < max
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn persist(&self, c: u32, data: &Arc<[u8]>) {
        // Memory bound: when the disk falls behind the network, fetchers wait for it
        // (bounded; past that the chunk is served but not cached).
        let start = Instant::now();
        while self.pending_bytes.load(Ordering::Relaxed) > MAX_PENDING_BYTES {
            if start.elapsed() > Duration::from_secs(10) {
                tracing::warn!("node store writes are too slow; a chunk is not cached");
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = w.as_ref() else { return };
        let fresh = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(c, data.clone())
            .is_none();
        if !fresh {
            return;
        }
        self.pending_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if tx.send(c).is_err() {
            if let Some(d) = self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&c)
            {
                self.pending_bytes
                    .fetch_sub(d.len() as u64, Ordering::Relaxed);
            }
        }
    }

    /// Stop the background workers (queued work is dropped) after the chunks fetched so
    /// far are in the node store.
    pub fn close(&self) {
        // The mount's device number may be another mount's soon: no more readahead
        // changes through it.
        *self.on_link.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.flush(Duration::from_secs(30));
        self.drain_seals(Duration::from_secs(60));
        {
            let mut q = self.seals.lock().unwrap_or_else(|e| e.into_inner());
            q.closed = true;
            q.todo.clear();
            self.sealing.notify_all();
        }
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.closed = true;
        q.high.clear();
        q.profile.clear();
        q.low.clear();
        self.queued.notify_all();
    }

    /// Queue chunks for a background fetch.
    pub fn enqueue(&self, chunks: Vec<u32>, prio: Priority) {
        if chunks.is_empty() || self.opts.workers == 0 {
            return;
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.closed {
            return;
        }
        match prio {
            Priority::High => q.high.push_back(chunks),
            Priority::Profile => q.profile.push_back(chunks),
            Priority::Low => q.low.push_back(chunks),
        }
        self.queued.notify_all();
    }

    /// Background jobs not yet started.
    pub fn queued_jobs(&self) -> usize {
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.high.len() + q.profile.len() + q.low.len()
    }

    /// Counters, plus whether all fetching and caching work is done (`idle`).
    pub fn counters_json(&self) -> serde_json::Value {
        let mut v = self.stats.to_json();
        let queued = self.queued_jobs() + self.busy.load(Ordering::SeqCst);
        let flights = self.flights.lock().unwrap_or_else(|e| e.into_inner()).len();
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner()).len();
        let sealing = {
            let q = self.seals.lock().unwrap_or_else(|e| e.into_inner());
            q.todo.len() + q.busy as usize
        };
        let queued = queued + sealing;
        v["files_to_seal"] = sealing.into();
        v["queued_jobs"] = queued.into();
        v["chunks_in_flight"] = flights.into();
        v["chunks_being_cached"] = pending.into();
        v["idle"] = (queued == 0 && flights == 0 && pending == 0).into();
        v["link_bytes_per_s"] = (self.link_rate().unwrap_or(0.0) as u64).into();
        v["link_fast"] = self.link_is_fast().into();
        v
    }

    fn worker(self: Arc<Self>, takes_low: bool) {
        loop {
            let job = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if q.closed {
                        return;
                    }
                    if let Some(j) = q.high.pop_front() {
                        self.busy.fetch_add(1, Ordering::SeqCst);
                        break (j, Priority::High);
                    }
                    if let Some(j) = q.profile.pop_front() {
                        self.busy.fetch_add(1, Ordering::SeqCst);
                        break (j, Priority::Profile);
                    }
                    if takes_low {
                        if let Some(j) = q.low.pop_front() {
                            self.busy.fetch_add(1, Ordering::SeqCst);
                            break (j, Priority::Low);
                        }
                    }
                    q = self.queued.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            let (chunks, prio) = job;
            // Only what is not in memory; node-store chunks are loaded into memory for a
            // reader that is about to want them, skipped otherwise.
            let todo: Vec<u32> = {
                let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                let mem = self.store.memory();
                chunks
                    .into_iter()
                    .filter(|c| {
                        !pending.contains_key(c)
                            && !mem.contains(&self.image.index.chunks[*c as usize].id)
                    })
                    .collect()
            };
            let lead = if prio == Priority::High {
                // On a slow link readahead only loads what the node store has: the
                // registry is asked for what readers ask for (a mapped library's page
                // faults look like a stream, but touch little of it).
                let todo = if self.link_is_fast() {
                    todo
                } else {
                    todo.into_iter()
                        .filter(|&c| self.store.contains(&self.image.index.chunks[c as usize].id))
                        .collect()
                };
                // Claimed first, so a reader arriving meanwhile waits for this load
                // instead of reading the same file from disk.
                let (lead, _) = self.claim(&todo);
                self.load_from_store(lead, &mut |_, _| {})
            } else {
                let todo: Vec<u32> = todo
                    .into_iter()
                    .filter(|&c| !self.store.contains(&self.image.index.chunks[c as usize].id))
                    .collect();
                let (lead, _) = self.claim(&todo);
                self.stats
                    .prefetched_chunks
                    .fetch_add(lead.len() as u64, Ordering::Relaxed);
                lead
            };
            let _ = self.fetch(&lead);
            self.busy.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Land the claimed chunks the node store (or shared tier) has, calling `got` with
    /// each; returns the rest, still claimed, for fetching.
    fn load_from_store(&self, claimed: Vec<u32>, got: &mut dyn FnMut(u32, Arc<[u8]>)) -> Vec<u32> {
        let mut rest = Vec::new();
        for c in claimed {
            match self.store.get(&self.image.index.chunks[c as usize].id) {
                Some(b) => {
                    self.stats.chunks_from_store.fetch_add(1, Ordering::Relaxed);
                    let d: Arc<[u8]> = b.into();
                    self.remember(c, &d);
                    self.land(c, Ok(d.clone()));
                    got(c, d);
                }
                None => rest.push(c),
            }
        }
        rest
    }

    fn remember(&self, c: u32, data: &Arc<[u8]>) {
        self.store
            .memory()
            .put(&self.image.index.chunks[c as usize].id, data);
    }

    fn recent(&self, c: u32) -> Option<Arc<[u8]>> {
        self.store
            .memory()
            .get(&self.image.index.chunks[c as usize].id)
    }

    /// Chunks that follow `missing` in their packs, up to `amplify` bytes after each,
    /// that nobody has, is caching or is fetching — claimed for this caller.
    /// Whether range requests have been running at `amplify_min_rate` or more.
    pub fn link_is_fast(&self) -> bool {
        self.link_fast.load(Ordering::Relaxed)
    }

    fn link_rate(&self) -> Option<f64> {
        self.link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rate(Instant::now())
    }

    /// Calls `hook` with every later change of the link verdict ([`Fetcher::link_is_fast`]).
    /// `hook` is called once now, with the verdict as it is; calls are serialized and each
    /// passes the verdict as it is at the call, so the last call has the latest.
    pub fn on_link_change(&self, hook: LinkHook) {
        let mut h = self.on_link.lock().unwrap_or_else(|e| e.into_inner());
        hook(self.link_is_fast());
        *h = Some(hook);
    }

    /// A busy period's bandwidth sample: the verdict follows it, with hysteresis (a fast
    /// link turns slow below three quarters of the threshold, a slow one fast at it), so
    /// a link measuring near the threshold does not flip back and forth.
    fn link_sample(&self, rate: f64) {
        let was = self.link_fast.load(Ordering::Relaxed);
        let fast = if was {
            rate >= self.opts.amplify_min_rate * 0.75
        } else {
            rate >= self.opts.amplify_min_rate
        };
        if self.link_fast.swap(fast, Ordering::Relaxed) != fast {
            tracing::info!(image = %self.image.manifest_desc.digest, bytes_per_s = rate as u64, fast, "registry link measured past its bursts: {}", if fast { "fast (readahead and neighbouring chunks on)" } else { "slow (only what readers ask for)" });
            if let Some(hook) = &*self.on_link.lock().unwrap_or_else(|e| e.into_inner()) {
                hook(self.link_is_fast());
            }
        }
    }

    fn amplify(&self, missing: &[u32]) -> Vec<u32> {
        let chunks = &self.image.index.chunks;
        let mut extra = Vec::new();
        let mut taken: HashSet<u32> = missing.iter().copied().collect();
        let mut take = |c: u32, extra: &mut Vec<u32>| {
            if taken.insert(c)
                && self.recent(c).is_none()
                && !self
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&c)
                && !self.store.contains(&chunks[c as usize].id)
            {
                extra.push(c);
            }
        };
        // The other chunks of each missing chunk's frame come with it for free.
        for &m in missing {
            let first = &chunks[m as usize];
            let at = self.pack_pos[m as usize] as usize;
            let before = self.pack_order[..at]
                .iter()
                .rev()
                .take_while(|&&c| chunks[c as usize].same_frame(first));
            let after = self.pack_order[at + 1..]
                .iter()
                .take_while(|&&c| chunks[c as usize].same_frame(first));
            for &c in before.chain(after) {
                take(c, &mut extra);
            }
        }
        if self.opts.amplify > 0 && self.link_is_fast() {
            for &m in missing {
                let first = &chunks[m as usize];
                let mut last = first;
                let mut end = first.offset + first.stored_len as u64;
                let mut p = self.pack_pos[m as usize] as usize + 1;
                while end - first.offset < self.opts.amplify {
                    let Some(&c) = self.pack_order.get(p) else {
                        break;
                    };
                    let loc = &chunks[c as usize];
                    if !loc.same_frame(last) {
                        if loc.pack != first.pack || loc.offset != end {
                            break;
                        }
                        end += loc.stored_len as u64;
                    }
                    last = loc;
                    p += 1;
                    take(c, &mut extra);
                }
            }
        }
        // Only what nobody else is already fetching; never wait for it.
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        extra.retain(|c| {
            if flights.contains_key(c) {
                return false;
            }
            flights.insert(*c, Arc::new(Flight::default()));
            true
        });
        extra
    }

    /// Register flights for the chunks nobody is fetching: returns (chunks this caller
    /// must fetch, flights of other fetchers to wait for).
    fn claim(&self, chunks: &[u32]) -> (Vec<u32>, Vec<(u32, Arc<Flight>)>) {
        let mut lead = Vec::new();
        let mut wait = Vec::new();
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        for &c in chunks {
            match flights.get(&c) {
                Some(f) => wait.push((c, f.clone())),
                None => {
                    flights.insert(c, Arc::new(Flight::default()));
                    lead.push(c);
                }
            }
        }
        (lead, wait)
    }

    fn land(&self, c: u32, outcome: Outcome) {
        let f = self
            .flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&c);
        if let Some(f) = f {
            *f.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
            f.done.notify_all();
        }
    }

    /// The bytes of every chunk in `wanted` (indices into the index's chunk table).
    pub fn chunks(&self, wanted: &[u32]) -> Result<HashMap<u32, Arc<[u8]>>, Failure> {
        let mut have: HashMap<u32, Arc<[u8]>> = HashMap::with_capacity(wanted.len());
        let mut missing = Vec::new();
        let mut seen = HashSet::new();
        for &c in wanted {
            if !seen.insert(c) {
                continue;
            }
            if let Some(d) = self.in_memory(c) {
                self.stats
                    .chunks_from_memory
                    .fetch_add(1, Ordering::Relaxed);
                have.insert(c, d);
                continue;
            }
            missing.push(c);
        }
        if missing.is_empty() {
            return Ok(have);
        }
        let (claimed, wait) = self.claim(&missing);
        let wanted_here: HashSet<u32> = claimed.iter().copied().collect();
        let mut lead = self.load_from_store(claimed, &mut |c, d| {
            have.insert(c, d);
        });
        lead.extend(self.amplify(&lead));
        let mut first_err = None;
        for (c, r) in self.fetch(&lead) {
            if !wanted_here.contains(&c) {
                // An amplified neighbour: cached for later readers, not needed here.
                continue;
            }
            match r {
                Ok(d) => {
                    have.insert(c, d);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let deadline = Instant::now() + self.opts.max_wait + Duration::from_secs(5);
        for (c, f) in wait {
            self.stats.shared_waits.fetch_add(1, Ordering::Relaxed);
            let mut r = f.result.lock().unwrap_or_else(|e| e.into_inner());
            while r.is_none() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                r = f
                    .done
                    .wait_timeout(r, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            match r.clone() {
                Some(Ok(d)) => {
                    have.insert(c, d);
                }
                Some(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                None => {
                    first_err.get_or_insert(Failure::Unavailable(
                        "timed out waiting for another reader's fetch".into(),
                    ));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(have),
        }
    }

    /// Fetch chunks this caller claimed, coalescing neighbours of one pack; lands every
    /// flight (success or failure) before returning.
    fn fetch(&self, lead: &[u32]) -> Vec<(u32, Outcome)> {
        let chunks = &self.image.index.chunks;
        let mut sorted = lead.to_vec();
        sorted.sort_by_key(|&c| self.pack_pos[c as usize]);
        let mut out = Vec::with_capacity(sorted.len());
        let mut i = 0;
        while i < sorted.len() {
            let first = &chunks[sorted[i] as usize];
            let mut last = first;
            let mut end = first.offset + first.stored_len as u64;
            let mut j = i + 1;
            while j < sorted.len() {
                let c = &chunks[sorted[j] as usize];
                if !c.same_frame(last) {
                    if c.pack != first.pack
                        || c.offset != end
                        || end - first.offset + c.stored_len as u64 > self.opts.max_range
                    {
                        break;
                    }
                    end += c.stored_len as u64;
                }
                last = c;
                j += 1;
            }
            let run = &sorted[i..j];
            match self.read_run(first.pack, first.offset, end - first.offset, run) {
                Ok(Got::Chunks(mut got)) => {
                    for &c in run {
                        let outcome = got.remove(&c).unwrap_or_else(|| {
                            Err(Failure::Corrupt("not found in its pack".into()))
                        });
                        self.land(c, outcome.clone());
                        out.push((c, outcome));
                    }
                }
                Ok(Got::Range(buf)) => {
                    let mut frame = FrameCache::default();
                    for &c in run {
                        let loc = &chunks[c as usize];
                        let s = (loc.offset - first.offset) as usize;
                        let outcome =
                            self.decode(loc, buf.get(s..s + loc.stored_len as usize), &mut frame);
                        if let Ok(d) = &outcome {
                            self.persist(c, d);
                            self.remember(c, d);
                        }
                        self.land(c, outcome.clone());
                        out.push((c, outcome));
                    }
                }
                Err(e) => {
                    self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, chunks = run.len(), "fetching chunks failed; reads of them fail with EIO");
                    for &c in run {
                        let outcome = Err(Failure::Unavailable(e.clone()));
                        self.land(c, outcome.clone());
                        out.push((c, outcome));
                    }
                }
            }
            i = j;
        }
        out
    }

    /// A fetched chunk from the stored bytes of its frame (None: not in what the
    /// registry sent), decoded (once per frame: `frame` keeps the latest) and verified;
    /// counted, and a failure logged (it is never cached).
    fn decode(
        &self,
        loc: &tessera_format::index::ChunkLoc,
        stored: Option<&[u8]>,
        frame: &mut FrameCache,
    ) -> Outcome {
        let decoded = frame.chunk(loc, stored);
        match decoded {
            Ok(data) => {
                self.stats.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                Ok(data.into())
            }
            Err(e) => {
                self.stats
                    .verification_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(chunk = %loc.id, error = %e, "chunk failed verification; not cached, reads of it fail with EIO");
                Err(Failure::Corrupt(e))
            }
        }
    }

    /// Retry `op` with exponential backoff while it fails with a retriable error, until
    /// `max_wait` has passed.
    fn retrying<T>(
        &self,
        what: &dyn Fn() -> String,
        op: &mut dyn FnMut() -> Result<T, OciError>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + self.opts.max_wait;
        let mut delay = Duration::from_millis(50);
        loop {
            self.stats.range_requests.fetch_add(1, Ordering::Relaxed);
            match op() {
                Ok(v) => return Ok(v),
                Err(e) if retriable(&e) && Instant::now() + delay < deadline => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(what = %what(), error = %e, retry_in_ms = delay.as_millis() as u64, "registry read failed; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(format!("{}: {e}", what())),
            }
        }
    }

    /// Bytes `offset..offset+len` of pack `pack` holding the chunks `run`; or, from a
    /// registry that ignores `Range`, the run's chunks out of the whole pack.
    fn read_run(&self, pack: u32, offset: u64, len: u64, run: &[u32]) -> Result<Got, String> {
        if self.whole_packs.load(Ordering::Relaxed) {
            return self.whole_pack(pack, run, None).map(Got::Chunks);
        }
        let digest = self.image.index.packs[pack as usize];
        let size = self.pack_size(pack);
        let got = self.retrying(
            &|| format!("pack {digest} bytes {offset}+{len}"),
            &mut || {
                let req = self
                    .link
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .start(Instant::now());
                let got = self.source.read_range_or_whole(&digest, offset, len, size);
                let n = match &got {
                    Ok(RangeRead::Range(b)) => b.len() as u64,
                    _ => 0,
                };
                let sample =
                    self.link
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .end(req, n, Instant::now());
                if let Some(rate) = sample {
                    self.link_sample(rate);
                }
                got
            },
        )?;
        match got {
            RangeRead::Range(b) => {
                self.stats
                    .bytes_fetched
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(Got::Range(b))
            }
            RangeRead::Whole(r) => {
                if !self.whole_packs.swap(true, Ordering::Relaxed) {
                    tracing::warn!(pack = %digest, "the registry ignores Range requests: fetching whole packs (once each) into the node store");
                }
                self.whole_pack(pack, run, Some(r)).map(Got::Chunks)
            }
        }
    }

    fn pack_size(&self, pack: u32) -> u64 {
        let digest = self.image.index.packs[pack as usize];
        self.image.packs.get(&digest).map_or(0, |d| d.size)
    }

    /// The chunks `run` of pack `pack`, from the whole pack: read from `first` (the
    /// answer of a range request that got the whole blob) or fetched (once, however many
    /// callers want chunks of it). Every chunk of the image in the pack is verified and
    /// written to the node store, so later reads find them there.
    fn whole_pack(
        &self,
        pack: u32,
        run: &[u32],
        first: Option<Box<dyn std::io::Read + Send>>,
    ) -> Result<HashMap<u32, Outcome>, String> {
        let lock = self
            .pack_loads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(pack)
            .or_default()
            .clone();
        let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
        if *done {
            // Fetched by another caller meanwhile: from the node store (unless evicted).
            let mut got = HashMap::new();
            for &c in run {
                match self.in_memory(c).or_else(|| {
                    self.store
                        .get(&self.image.index.chunks[c as usize].id)
                        .map(Into::into)
                }) {
                    Some(d) => {
                        got.insert(c, Ok(d));
                    }
                    None => break,
                }
            }
            if got.len() == run.len() {
                return Ok(got);
            }
        }
        let digest = self.image.index.packs[pack as usize];
        let size = self.pack_size(pack);
        let mut r = match first {
            Some(r) => r,
            None => self.retrying(&|| format!("pack {digest}"), &mut || {
                self.source.open_blob(&digest, size)
            })?,
        };
        let chunks = &self.image.index.chunks;
        let start = self
            .pack_order
            .partition_point(|&c| chunks[c as usize].pack < pack);
        let wanted: HashSet<u32> = run.iter().copied().collect();
        let mut got = HashMap::new();
        let mut batch: Vec<(tessera_format::Digest, Arc<[u8]>)> = Vec::new();
        let mut batch_bytes = 0;
        let flush = |batch: &mut Vec<(tessera_format::Digest, Arc<[u8]>)>| {
            let items: Vec<_> = batch.iter().map(|(id, d)| (*id, &d[..])).collect();
            if let Err(e) = self.store.put_many(&items) {
                tracing::warn!(error = %e, chunks = items.len(), "cannot cache chunks in the node store");
            }
            batch.clear();
        };
        let mut pos = 0u64;
        let mut buf = Vec::new();
        let mut frame = FrameCache::default();
        let mut last: Option<&tessera_format::index::ChunkLoc> = None;
        let io = |e: std::io::Error| format!("reading pack {digest}: {e}");
        for &c in self.pack_order[start..]
            .iter()
            .take_while(|&&c| chunks[c as usize].pack == pack)
        {
            let loc = &chunks[c as usize];
            if !last.is_some_and(|l| l.same_frame(loc)) {
                if loc.offset < pos {
                    // Overlaps the previous frame: not a pack this index describes.
                    if wanted.contains(&c) {
                        got.insert(c, Err(Failure::Corrupt("overlapping frames".into())));
                    }
                    continue;
                }
                std::io::copy(
                    &mut std::io::Read::take(&mut r, loc.offset - pos),
                    &mut std::io::sink(),
                )
                .map_err(io)?;
                buf.resize(loc.stored_len as usize, 0);
                std::io::Read::read_exact(&mut r, &mut buf).map_err(io)?;
                pos = loc.offset + loc.stored_len as u64;
                last = Some(loc);
            }
            let outcome = self.decode(loc, Some(&buf), &mut frame);
            if let Ok(d) = &outcome {
                batch_bytes += d.len();
                batch.push((loc.id, d.clone()));
                if batch_bytes >= WHOLE_PACK_BATCH {
                    flush(&mut batch);
                    batch_bytes = 0;
                }
            }
            if wanted.contains(&c) {
                if let Ok(d) = &outcome {
                    self.remember(c, d);
                }
                got.insert(c, outcome);
            }
        }
        flush(&mut batch);
        // The rest of the pack, so the reader checks the whole blob's digest.
        let rest = std::io::copy(&mut r, &mut std::io::sink());
        self.stats.bytes_fetched.fetch_add(size, Ordering::Relaxed);
        if let Err(e) = rest {
            tracing::warn!(pack = %digest, error = %e, "a pack fetched whole failed its digest check (its chunks were verified one by one)");
        }
        *done = true;
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    /// A link: `burst` bytes at `line` bytes/s (a token bucket's), then `rate`; a round
    /// trip of `rtt` s. First one small request alone (16 KiB), then rounds of `k`
    /// requests of `request` bytes sent together, each round ending when its last byte
    /// arrives. Returns the meter's samples.
    fn link(
        burst: u64,
        line: f64,
        rate: f64,
        rtt: f64,
        request: u64,
        k: u32,
        total: u64,
    ) -> Vec<f64> {
        let mut m = LinkMeter::default();
        let t0 = Instant::now();
        let at = |t: f64| t0 + Duration::from_secs_f64(t);
        let (mut t, mut sent, mut samples) = (0.0f64, 0u64, Vec::new());
        let round = |m: &mut LinkMeter, t: &mut f64, sent: &mut u64, size: u64, k: u32| {
            let bytes = size * k as u64;
            let fast = bytes.min(burst.saturating_sub(*sent));
            let reqs: Vec<InFlight> = (0..k).map(|_| m.start(at(*t))).collect();
            *t += rtt + fast as f64 / line + (bytes - fast) as f64 / rate;
            *sent += bytes;
            let mut got = Vec::new();
            for r in reqs {
                if let Some(x) = m.end(r, size, at(*t)) {
                    got.push(x);
                }
            }
            got
        };
        round(&mut m, &mut t, &mut sent, 16 << 10, 1);
        while sent < total {
            samples.extend(round(&mut m, &mut t, &mut sent, request, k));
            t += 0.0002;
        }
        samples
    }

    #[test]
    fn a_burst_does_not_make_a_slow_link_fast() {
        // 100 Mbit/s behind a 1 MB burst delivered at 1 GB/s; 4 requests at a time.
        let s = link(MB, 1e9, 12.5e6, 0.0003, 64 << 10, 4, 20 * MB);
        assert!(!s.is_empty(), "no verdict after 20 MB");
        // Below three quarters of the threshold: a fast first guess (the index came in
        // the burst) turns slow at the first sample.
        assert!(
            s.iter().all(|&r| r < 24e6),
            "slow link taken for fast: {s:?}"
        );
        // The same link without a burst, one request at a time.
        let s = link(0, 1e9, 12.5e6, 0.0003, 192 << 10, 1, 8 * MB);
        assert!(!s.is_empty() && s.iter().all(|&r| r < 24e6), "{s:?}");
    }

    #[test]
    fn round_trips_do_not_make_a_fast_link_slow() {
        // 1 Gbit/s, 30 ms away: a 192 KiB request takes 31.6 ms, 6 MB/s if its whole
        // time were transfer. One at a time, and eight at a time.
        for k in [1, 8] {
            let s = link(0, 125e6, 125e6, 0.030, 192 << 10, k, 16 * MB);
            assert!(!s.is_empty() && s.iter().all(|&r| r > 32e6), "k={k}: {s:?}");
        }
        // Loopback with a busy client: small requests, short round trips.
        let s = link(0, 400e6, 400e6, 0.0005, 64 << 10, 4, 16 * MB);
        assert!(!s.is_empty() && s.iter().all(|&r| r > 32e6), "{s:?}");
    }

    #[test]
    fn a_long_burst_fools_the_first_sample_only() {
        // 6 MB at line rate, then 12.5 MB/s: the period's rate falls below the threshold.
        let s = link(6 * MB, 1e9, 12.5e6, 0.0003, 256 << 10, 1, 40 * MB);
        assert!(s[0] > 32e6, "{s:?}");
        assert!(*s.last().unwrap() < 24e6, "{s:?}");
    }

    #[test]
    fn idle_gaps_start_a_new_sample() {
        let mut m = LinkMeter::default();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // 3 MiB in one period, then idle: no verdict (the sample is too small).
        let r = m.start(ms(0));
        assert_eq!(m.end(r, 3 << 20, ms(10)), None);
        // A second period of 3 MiB, a second later, does not add to the first.
        let r = m.start(ms(1000));
        assert_eq!(m.end(r, 3 << 20, ms(1010)), None);
        // Two requests overlapping, the second running alone at the end: each counts for
        // its time over 1.5 (no round trip known).
        let (a, b) = (m.start(ms(2000)), m.start(ms(2000)));
        assert_eq!(m.end(a, 2 << 20, ms(2100)), None);
        let r = m.end(b, 2 << 20, ms(2200)).unwrap();
        assert!((r - (4 << 20) as f64 / 0.2).abs() < 1.0, "{r}");
        // The reported rate spans every period: 10 MiB over 0.22 s busy.
        let all = m.rate(ms(5000)).unwrap();
        assert!((all - (10 << 20) as f64 / 0.22).abs() < 10.0, "{all}");
    }

    #[test]
    fn a_reader_waiting_for_each_chunk_makes_one_sample() {
        // One request at a time, 1 ms apart: one period, its pauses counted.
        let mut m = LinkMeter::default();
        let t0 = Instant::now();
        let mut t = t0;
        let mut last = None;
        for _ in 0..64 {
            let r = m.start(t);
            t += Duration::from_millis(1);
            last = m.end(r, 64 << 10, t);
            t += Duration::from_millis(1);
        }
        let r = last.expect("4 MiB in one period is a sample");
        assert!((r - (4 << 20) as f64 / 0.127).abs() < 1e3, "{r}");
    }
}
