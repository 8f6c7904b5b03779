//! The snapshotter's logic, blocking and independent of gRPC: containerd's snapshot
//! semantics over `ROOT/snapshots/<id>/` directories and overlayfs, plus the lazy path.
//!
//! * A local snapshot is a directory `fs/` (with `work/` while active). Its mounts are a
//!   bind mount when it has no parent and overlayfs otherwise, the parents' `fs/`
//!   directories as lower layers, topmost first, exactly as containerd's overlayfs
//!   snapshotter does.
//! * An unpack `Prepare` of a layer of an image that has a tessera twin
//!   ([`crate::remote`]) is answered at once: the layer becomes a committed snapshot and
//!   containerd hears `AlreadyExists`, so it downloads nothing. The image's top layer
//!   becomes a *lazy* snapshot: the twin (the image's whole tree) mounted lazily at
//!   `lazy/`. Lower layers become *placeholders*: their chain ids are real (another
//!   image may share them), so the first time one is needed as a real parent (by an
//!   image without a twin that builds on it) its layer is downloaded, verified and
//!   unpacked into `fs/`. Mounts over a lazy snapshot stop at it: it holds every layer
//!   below it already.
//! * The record in the database is the truth. A directory without a record is debris
//!   of a crash and is removed at startup and on `Cleanup`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tessera_mount::session::{self, Job, Jobs, MountSpec};
use tessera_mount::store::NodeStore;

use crate::keeper::Keeper;

use crate::meta::{self, Kind, Meta, Record, Source};
use crate::metrics::Metrics;
use crate::remote::{LayerInfo, Resolver, LABEL_TARGET, LABEL_TWIN};
use crate::{layer, NodeError};

/// One mount containerd should make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// A snapshot as containerd sees it.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub name: String,
    pub record: Record,
}

pub struct Node {
    root: PathBuf,
    meta: Meta,
    store: Arc<NodeStore>,
    resolver: Resolver,
    spec: MountSpec,
    /// Serializes changes of the snapshot table with the directories they name.
    lock: Mutex<()>,
    /// Serializes materializations (a layer download may take a while; other calls go on).
    materializing: Mutex<()>,
    /// Lazy mounts being served, by snapshot id.
    lazy: Arc<Mutex<HashMap<u64, Arc<Job>>>>,
    jobs: Jobs,
    publisher_done: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    overlay_index_off: bool,
    /// Directories the start-up cleanup removed.
    cleaned_at_open: std::sync::atomic::AtomicUsize,
    /// Holds every lazy mount's FUSE connection across daemon restarts (None: the
    /// mounts end with this process).
    keeper: Option<Arc<Keeper>>,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let context = context.into();
    move |source| NodeError::Io { context, source }
}

impl Node {
    /// Open the node's state under `root` (created if missing) and remove debris of a
    /// crash. [`Node::resume`] then serves the lazy snapshots again.
    pub fn open(
        root: &Path,
        store: Arc<NodeStore>,
        resolver: Resolver,
        mut spec: MountSpec,
        metrics: Arc<Metrics>,
        keeper: Option<Arc<Keeper>>,
    ) -> Result<Arc<Node>, NodeError> {
        std::fs::create_dir_all(root.join("snapshots"))
            .map_err(io(format!("creating {}", root.join("snapshots").display())))?;
        let meta = Meta::open(&root.join("snapshots.redb"))?;
        // Container processes run as any user and may need setuid binaries and device
        // nodes of their image: what a runtime's root filesystem honours.
        spec.access.allow_other = true;
        spec.access.suid = true;
        spec.access.dev = true;
        spec.writable = false;
        let jobs: Jobs = Arc::default();
        let publisher_done = Arc::new(AtomicBool::new(false));
        session::publisher(store.clone(), jobs.clone(), publisher_done.clone());
        let node = Arc::new(Node {
            root: root.to_path_buf(),
            meta,
            store,
            resolver,
            spec,
            lock: Mutex::new(()),
            materializing: Mutex::new(()),
            lazy: Arc::default(),
            jobs,
            publisher_done,
            metrics,
            overlay_index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
            cleaned_at_open: Default::default(),
            keeper,
        });
        let removed = node.cleanup()?;
        node.cleaned_at_open.store(removed, Ordering::SeqCst);
        Ok(node)
    }

    /// Serve every lazy snapshot again: take over the mounts a daemon before this one
    /// left with the keeper (running containers keep reading them), mount the others.
    /// One that cannot be served now (its registry is down, say) is tried again every
    /// few seconds in the background: a container may be waiting on its mount.
    pub fn resume(self: &Arc<Self>) -> Result<(), NodeError> {
        let records = self.meta.all()?;
        // Connections the keeper holds for snapshots that are gone (a crash between a
        // removal's record and its unmount) go.
        if let Some(k) = &self.keeper {
            let live: HashSet<String> = records
                .iter()
                .filter(|(_, r)| matches!(r.source, Source::Lazy { .. }))
                .map(|(_, r)| keeper_name(r.id))
                .collect();
            match k.list() {
                Ok(held) => {
                    for name in held.iter().filter(|n| !live.contains(*n)) {
                        tracing::info!(%name, "the keeper held a mount of a snapshot that is gone; letting it go");
                        let _ = k.forget(name);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list the keeper's mounts"),
            }
        }
        let mut failed = Vec::new();
        for (key, rec) in records {
            if let Source::Lazy { twin, .. } = &rec.source {
                if let Err(e) = self.ensure_lazy(rec.id, twin) {
                    tracing::warn!(%key, %twin, error = %e, "cannot serve a lazy snapshot again; retrying in the background");
                    failed.push((key, rec.id, twin.clone()));
                }
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        let node = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("tessera-node-resume".into())
            .spawn(move || {
                let mut wait = std::time::Duration::from_secs(2);
                while !failed.is_empty() {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(std::time::Duration::from_secs(30));
                    let Some(node) = node.upgrade() else { return };
                    if node.publisher_done.load(Ordering::SeqCst) {
                        return;
                    }
                    failed.retain(|(key, id, twin)| {
                        // Gone meanwhile (removed), or served by a call that needed it.
                        if !matches!(node.meta.get(key), Ok(Some(r)) if r.id == *id)
                            || node.lazy.lock().unwrap_or_else(|e| e.into_inner()).contains_key(id)
                        {
                            return false;
                        }
                        match node.ensure_lazy(*id, twin) {
                            Ok(()) => false,
                            Err(e) => {
                                tracing::warn!(%key, %twin, error = %e, "still cannot serve a lazy snapshot; retrying");
                                true
                            }
                        }
                    });
                }
            })
            .map_err(io("starting the resume thread"))?;
        Ok(())
    }

    /// How many unreferenced snapshot directories opening the node removed.
    pub fn cleaned_at_open(&self) -> usize {
        self.cleaned_at_open.load(Ordering::SeqCst)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stat(&self, key: &str) -> Result<SnapshotInfo, NodeError> {
        let record = self
            .meta
            .get(key)?
            .ok_or_else(|| NodeError::NotFound(format!("snapshot {key}")))?;
        Ok(SnapshotInfo {
            name: key.to_string(),
            record,
        })
    }

    pub fn list(&self) -> Result<Vec<SnapshotInfo>, NodeError> {
        Ok(self
            .meta
            .all()?
            .into_iter()
            .map(|(name, record)| SnapshotInfo { name, record })
            .collect())
    }

    /// Replace labels (no field paths, or `labels`) or set/remove single ones
    /// (`labels.KEY`).
    pub fn update(
        &self,
        key: &str,
        labels: HashMap<String, String>,
        paths: &[String],
    ) -> Result<SnapshotInfo, NodeError> {
        let _g = self.guard();
        let record = self.meta.write(|tx| {
            let mut rec = tx
                .get(key)?
                .ok_or_else(|| NodeError::NotFound(format!("snapshot {key}")))?;
            if paths.is_empty() || paths.iter().any(|p| p == "labels") {
                rec.labels = labels.clone();
            } else {
                for p in paths {
                    let Some(k) = p.strip_prefix("labels.") else {
                        return Err(NodeError::BadInput(format!(
                            "cannot update field {p:?} of a snapshot (only labels and labels.KEY)"
                        )));
                    };
                    match labels.get(k) {
                        Some(v) => rec.labels.insert(k.to_string(), v.clone()),
                        None => rec.labels.remove(k),
                    };
                }
            }
            rec.updated = meta::now();
            tx.put(key, &rec)?;
            Ok(rec)
        })?;
        Ok(SnapshotInfo {
            name: key.to_string(),
            record,
        })
    }

    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<MountEntry>, NodeError> {
        if let Some(info) = LayerInfo::from_labels(&labels)? {
            match self.try_remote(key, parent, &labels, &info) {
                Ok(true) => {
                    return Err(NodeError::AlreadyExists(format!(
                        "target snapshot {}",
                        info.target
                    )))
                }
                Ok(false) => {}
                Err(e @ NodeError::AlreadyExists(_)) => return Err(e),
                Err(e) => {
                    // The image still runs: containerd unpacks the layer itself.
                    self.metrics.twin_fallbacks.inc();
                    tracing::warn!(image = %info.image_ref, layer = %info.layer, error = %e, "cannot serve the layer from its tessera twin; containerd unpacks it");
                }
            }
        }
        self.create(key, parent, labels, Kind::Active)
    }

    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<MountEntry>, NodeError> {
        self.create(key, parent, labels, Kind::View)
    }

    /// Whether the layer `info` names was answered from a twin (a committed snapshot
    /// now stands for it).
    fn try_remote(
        &self,
        key: &str,
        parent: &str,
        labels: &HashMap<String, String>,
        info: &LayerInfo,
    ) -> Result<bool, NodeError> {
        if self.find_target(&info.target, parent)?.is_some() {
            return Ok(true);
        }
        let Some(twin) = self.resolver.twin(info)? else {
            return Ok(false);
        };
        let Some(pos) = twin.position(&info.target) else {
            return Err(NodeError::BadInput(format!(
                "chain id {} is not one of the image {}",
                info.target, info.manifest
            )));
        };
        let (digest, media_type, size) = twin.layers[pos].clone();
        if digest != info.layer {
            return Err(NodeError::BadInput(format!(
                "layer {} of {} is {digest}, not {} as containerd says",
                pos + 1,
                info.manifest,
                info.layer
            )));
        }
        let source = if twin.is_top(pos) {
            Source::Lazy {
                twin: twin.twin_ref.clone(),
                image: info.image_ref.clone(),
            }
        } else {
            Source::Placeholder {
                image: twin.repo.clone(),
                layer: digest,
                media_type,
                size,
            }
        };
        let mut labels = labels.clone();
        labels.insert(LABEL_TWIN.into(), twin.twin_ref.clone());
        let _g = self.guard();
        let id = self.meta.write(|tx| {
            if let Some(p) = (!parent.is_empty()).then_some(parent) {
                if tx.get(p)?.is_none() {
                    return Err(NodeError::NotFound(format!("parent snapshot {p}")));
                }
            }
            let id = tx.next_id()?;
            let now = meta::now();
            tx.put(
                &remote_name(id),
                &Record {
                    id,
                    kind: Kind::Committed,
                    parent: parent.to_string(),
                    labels,
                    created: now,
                    updated: now,
                    source: source.clone(),
                },
            )?;
            Ok(id)
        })?;
        drop(_g);
        if let Source::Lazy { twin: t, .. } = &source {
            if let Err(e) = self.ensure_lazy(id, t) {
                // Not half there: the record goes, containerd unpacks the layer itself.
                let _ = self.remove(&remote_name(id));
                return Err(e);
            }
            self.metrics.lazy_images.inc();
        } else {
            self.metrics.placeholders.inc();
        }
        tracing::info!(%key, target = %info.target, image = %info.image_ref, lazy = matches!(source, Source::Lazy { .. }), "layer answered from the tessera twin");
        Ok(true)
    }

    /// The committed snapshot that stands for chain id `target` over `parent`.
    fn find_target(&self, target: &str, parent: &str) -> Result<Option<String>, NodeError> {
        Ok(self
            .meta
            .all()?
            .into_iter()
            .find(|(_, r)| {
                r.kind == Kind::Committed
                    && r.parent == parent
                    && r.labels.get(LABEL_TARGET).map(String::as_str) == Some(target)
            })
            .map(|(k, _)| k))
    }

    fn create(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<MountEntry>, NodeError> {
        if key.is_empty() {
            return Err(NodeError::BadInput(
                "a snapshot key must not be empty".into(),
            ));
        }
        // Parents are made real first (a placeholder parent downloads its layer).
        let lowers = if parent.is_empty() {
            Vec::new()
        } else {
            self.lowers(parent)?
        };
        let _g = self.guard();
        let id = self.meta.write(|tx| {
            if tx.get(key)?.is_some() {
                return Err(NodeError::AlreadyExists(format!("snapshot {key}")));
            }
            if !parent.is_empty() {
                match tx.get(parent)? {
                    None => return Err(NodeError::NotFound(format!("parent snapshot {parent}"))),
                    Some(p) if p.kind != Kind::Committed => {
                        return Err(NodeError::FailedPrecondition(format!(
                            "parent {parent} is not committed"
                        )))
                    }
                    Some(_) => {}
                }
            }
            let id = tx.next_id()?;
            let d = self.dir(id);
            std::fs::create_dir_all(d.join("fs"))
                .map_err(io(format!("creating {}", d.display())))?;
            if kind == Kind::Active {
                std::fs::create_dir_all(d.join("work"))
                    .map_err(io(format!("creating {}", d.display())))?;
            }
            crash_point("prepare");
            let now = meta::now();
            tx.put(
                key,
                &Record {
                    id,
                    kind,
                    parent: parent.to_string(),
                    labels,
                    created: now,
                    updated: now,
                    source: Source::Local,
                },
            )?;
            Ok(id)
        })?;
        Ok(self.mount_entries(id, kind, &lowers))
    }

    fn mount_entries(&self, id: u64, kind: Kind, lowers: &[PathBuf]) -> Vec<MountEntry> {
        let d = self.dir(id);
        let s = |p: &Path| p.display().to_string();
        if kind == Kind::Active {
            if lowers.is_empty() {
                return vec![MountEntry {
                    kind: "bind".into(),
                    source: s(&d.join("fs")),
                    options: vec!["rw".into(), "rbind".into()],
                }];
            }
            let mut options = Vec::new();
            if self.overlay_index_off {
                options.push("index=off".into());
            }
            options.push(format!("workdir={}", s(&d.join("work"))));
            options.push(format!("upperdir={}", s(&d.join("fs"))));
            options.push(format!("lowerdir={}", join(lowers)));
            return vec![MountEntry {
                kind: "overlay".into(),
                source: "overlay".into(),
                options,
            }];
        }
        match lowers {
            [] => vec![MountEntry {
                kind: "bind".into(),
                source: s(&d.join("fs")),
                options: vec!["ro".into(), "rbind".into()],
            }],
            [one] => vec![MountEntry {
                kind: "bind".into(),
                source: s(one),
                options: vec!["ro".into(), "rbind".into()],
            }],
            many => vec![MountEntry {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![format!("lowerdir={}", join(many))],
            }],
        }
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<MountEntry>, NodeError> {
        let rec = self.stat(key)?.record;
        match rec.kind {
            Kind::Active | Kind::View => {
                let lowers = if rec.parent.is_empty() {
                    Vec::new()
                } else {
                    self.lowers(&rec.parent)?
                };
                Ok(self.mount_entries(rec.id, rec.kind, &lowers))
            }
            Kind::Committed => {
                let lowers = self.lowers(key)?;
                Ok(self.mount_entries(rec.id, Kind::View, &lowers))
            }
        }
    }

    /// The directories that make up committed snapshot `key` and its parents, topmost
    /// first; placeholders on the way are made real, a lazy snapshot ends the chain.
    fn lowers(&self, key: &str) -> Result<Vec<PathBuf>, NodeError> {
        let mut out = Vec::new();
        let mut k = key.to_string();
        let mut seen = HashSet::new();
        while !k.is_empty() {
            if !seen.insert(k.clone()) {
                return Err(NodeError::Db(format!("snapshot {key} has a parent cycle")));
            }
            let rec = self
                .meta
                .get(&k)?
                .ok_or_else(|| NodeError::NotFound(format!("parent snapshot {k}")))?;
            if rec.kind != Kind::Committed {
                return Err(NodeError::FailedPrecondition(format!(
                    "parent {k} is not committed"
                )));
            }
            match &rec.source {
                Source::Local => out.push(self.dir(rec.id).join("fs")),
                Source::Lazy { twin, .. } => {
                    self.ensure_lazy(rec.id, twin)?;
                    out.push(self.dir(rec.id).join("lazy"));
                    break;
                }
                Source::Placeholder { .. } => {
                    self.materialize(&k)?;
                    out.push(self.dir(rec.id).join("fs"));
                }
            }
            k = rec.parent.clone();
        }
        Ok(out)
    }

    /// Download and unpack the layer a placeholder stands for; it becomes local.
    fn materialize(&self, key: &str) -> Result<(), NodeError> {
        let _m = self.materializing.lock().unwrap_or_else(|e| e.into_inner());
        let rec = self.stat(key)?.record;
        let Source::Placeholder {
            image,
            layer: digest,
            media_type,
            size,
        } = &rec.source
        else {
            return Ok(()); // another call did it
        };
        let t0 = std::time::Instant::now();
        let d = self.dir(rec.id);
        let tmp = d.join("fs.partial");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(format!("removing {}", tmp.display())))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        let comp = layer::compression(media_type)?;
        let reference = format!("{image}@{digest}");
        let (store, _) = self
            .resolver
            .registry_options()
            .open(&reference)
            .map_err(|e| NodeError::Registry(format!("{reference}: {e}")))?;
        let sha = digest
            .parse::<tessera_format::Digest>()
            .map_err(|e| NodeError::BadInput(format!("layer digest {digest}: {e}")))?;
        let blob = store
            .open_blob(&sha, *size)
            .map_err(|e| NodeError::Registry(format!("layer {reference}: {e}")))?;
        let entries = layer::unpack(blob, comp, &tmp)?;
        let fs_dir = d.join("fs");
        if fs_dir.exists() {
            std::fs::remove_dir_all(&fs_dir)
                .map_err(io(format!("removing {}", fs_dir.display())))?;
        }
        std::fs::rename(&tmp, &fs_dir).map_err(io(format!("renaming {}", tmp.display())))?;
        let _g = self.guard();
        self.meta.write(|tx| {
            if let Some(mut r) = tx.get(key)? {
                r.source = Source::Local;
                r.updated = meta::now();
                tx.put(key, &r)?;
            }
            Ok(())
        })?;
        self.metrics.materialized.inc();
        tracing::info!(%key, layer = %reference, entries, ms = t0.elapsed().as_millis() as u64, "placeholder layer unpacked: a plain image builds on it");
        Ok(())
    }

    /// Make sure the lazy mount of snapshot `id` is being served.
    fn ensure_lazy(&self, id: u64, twin: &str) -> Result<(), NodeError> {
        let mut lazy = self.lazy.lock().unwrap_or_else(|e| e.into_inner());
        if lazy.contains_key(&id) {
            return Ok(());
        }
        let dir = self.dir(id).join("lazy");
        let name = keeper_name(id);
        // The mount a daemon before this one served, if the keeper held on to it and it
        // is still the one at `dir`.
        let adopt = match &self.keeper {
            Some(k) => match k.take(&name) {
                Ok(Some(c))
                    if tessera_mount::mount_dev(&dir) == Some(c.dev) && connection_alive(&c.fd) =>
                {
                    Some(c)
                }
                Ok(Some(_)) => {
                    let _ = k.forget(&name);
                    None
                }
                Ok(None) => None,
                // Not "not held": the keeper may hold it, and a running container may
                // be waiting on it. Mounting anew would cut the container off: fail this
                // call instead (a later use, or the resume thread, tries again).
                Err(e) => {
                    return Err(NodeError::Mount(format!(
                        "cannot ask the keeper for the mount of snapshot {id}: {e}"
                    )))
                }
            },
            None => None,
        };
        // A mount left by a daemon that died and that nothing kept is dead (ENOTCONN):
        // detach it first.
        if adopt.is_none() && is_mountpoint(&dir) {
            let _ = rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::DETACH);
        }
        let adopted = adopt.is_some();
        if !adopted {
            // Never a stat of `dir`: whatever was mounted there may have nobody serving
            // it (mkdir answers EEXIST without asking the mount).
            let parent = self.dir(id);
            std::fs::create_dir_all(&parent)
                .and_then(|()| match std::fs::create_dir(&dir) {
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                    r => r,
                })
                .map_err(io(format!("creating {}", dir.display())))?;
        }
        let keep = self.keeper.clone().map(|k| {
            let name = name.clone();
            Box::new(move |c: &tessera_mount::FuseConn| {
                if !c.resumable {
                    // Kept, a reader waiting when the daemon dies would wait forever
                    // (and could not be killed); unkept, it gets an error.
                    tracing::warn!(%name, "the kernel cannot resend FUSE requests (Linux 6.9+): this mount is not kept and ends with this daemon");
                    return;
                }
                if let Err(e) = k.keep(&name, c) {
                    tracing::warn!(%name, error = %e, "the keeper cannot hold this mount: it ends with this daemon");
                }
            }) as session::KeepConn
        });
        let handover = session::Handover {
            adopt,
            keep,
            opens_log: Some(self.dir(id).join("opens.log")),
        };
        let (job, session) =
            session::start_with(twin, &dir, id as usize, &self.spec, &self.store, handover)
                .map_err(|e| NodeError::Mount(e.to_string()))?;
        if adopted {
            self.metrics.adopted_mounts.inc();
        }
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(job.clone());
        lazy.insert(id, job.clone());
        self.metrics.lazy_mounts.inc();
        let store = self.store.clone();
        let jobs = self.jobs.clone();
        let metrics = self.metrics.clone();
        let lazy_map = self.lazy.clone();
        std::thread::Builder::new()
            .name("tessera-node-reap".into())
            .spawn(move || {
                if let Err(e) = job.wait(session, &store) {
                    tracing::warn!(error = %e, "lazy mount ended with an error");
                }
                jobs.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|j| !Arc::ptr_eq(j, &job));
                // A mount that ended by itself (its connection aborted) is not served:
                // the next use mounts it again instead of handing out its directory.
                let mut lazy = lazy_map.lock().unwrap_or_else(|e| e.into_inner());
                if lazy.get(&id).is_some_and(|j| Arc::ptr_eq(j, &job)) {
                    lazy.remove(&id);
                }
                drop(lazy);
                metrics.lazy_mounts.dec();
            })
            .map_err(io("starting a mount's reaper"))?;
        tracing::info!(id, %twin, dir = %dir.display(), adopted, "lazy mount up");
        Ok(())
    }

    fn drop_lazy(&self, id: u64) {
        let job = self
            .lazy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(k) = &self.keeper {
            if let Err(e) = k.forget(&keeper_name(id)) {
                tracing::warn!(id, error = %e, "cannot tell the keeper a mount is going");
            }
        }
        if let Some(job) = job {
            if let Err(e) = tessera_mount::unmount(&job.dir) {
                tracing::warn!(dir = %job.dir.display(), error = %e, "cannot unmount a lazy snapshot; detaching it");
                let _ = rustix::mount::unmount(&job.dir, rustix::mount::UnmountFlags::DETACH);
            }
        } else {
            // Not served (a failed start): whatever is mounted there has nobody behind it.
            let dir = self.dir(id).join("lazy");
            if is_mountpoint(&dir) {
                let _ = rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::DETACH);
            }
        }
    }

    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), NodeError> {
        let _g = self.guard();
        self.meta.write(|tx| {
            let rec = tx
                .get(key)?
                .ok_or_else(|| NodeError::NotFound(format!("snapshot {key}")))?;
            if rec.kind != Kind::Active {
                return Err(NodeError::FailedPrecondition(format!(
                    "snapshot {key} is {}, only an active snapshot can be committed",
                    rec.kind.as_str()
                )));
            }
            if tx.get(name)?.is_some() {
                return Err(NodeError::AlreadyExists(format!("snapshot {name}")));
            }
            let now = meta::now();
            tx.delete(key)?;
            tx.put(
                name,
                &Record {
                    kind: Kind::Committed,
                    labels,
                    created: now,
                    updated: now,
                    ..rec
                },
            )
        })?;
        crash_point("commit");
        // The work directory of an active overlay is not needed any more.
        let _ = std::fs::remove_dir_all(self.dir(self.stat(name)?.record.id).join("work"));
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<(), NodeError> {
        let _g = self.guard();
        let rec = self.meta.write(|tx| {
            let rec = tx
                .get(key)?
                .ok_or_else(|| NodeError::NotFound(format!("snapshot {key}")))?;
            if tx.all()?.iter().any(|(_, r)| r.parent == key) {
                return Err(NodeError::FailedPrecondition(format!(
                    "cannot remove snapshot {key}: it has children"
                )));
            }
            tx.delete(key)?;
            Ok(rec)
        })?;
        drop(_g);
        if matches!(rec.source, Source::Lazy { .. }) {
            self.drop_lazy(rec.id);
            self.metrics.lazy_images.dec();
        }
        let d = self.dir(rec.id);
        if let Err(e) = std::fs::remove_dir_all(&d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %d.display(), error = %e, "cannot remove a snapshot's files; Cleanup retries");
            }
        }
        Ok(())
    }

    /// Bytes and inodes a snapshot holds on this node's disk (its own layer only).
    pub fn usage(&self, key: &str) -> Result<(i64, i64), NodeError> {
        let rec = self.stat(key)?.record;
        match rec.source {
            Source::Local => Ok(disk_usage(&self.dir(rec.id).join("fs"))),
            Source::Lazy { .. } | Source::Placeholder { .. } => Ok((0, 0)),
        }
    }

    /// Remove what no record names: directories of snapshots, and their mounts.
    pub fn cleanup(&self) -> Result<usize, NodeError> {
        let _g = self.guard();
        let live: HashSet<u64> = self.meta.all()?.iter().map(|(_, r)| r.id).collect();
        let dir = self.root.join("snapshots");
        let mut removed = 0;
        for e in std::fs::read_dir(&dir)
            .map_err(io(format!("reading {}", dir.display())))?
            .flatten()
        {
            let Some(id) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            if live.contains(&id) {
                continue;
            }
            let lazy = e.path().join("lazy");
            if let Some(k) = &self.keeper {
                let _ = k.forget(&keeper_name(id));
            }
            if is_mountpoint(&lazy) {
                let _ = rustix::mount::unmount(&lazy, rustix::mount::UnmountFlags::DETACH);
            }
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => removed += 1,
                Err(err) => {
                    tracing::warn!(dir = %e.path().display(), error = %err, "cannot remove an unreferenced snapshot directory")
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed snapshot directories no record names");
        }
        Ok(removed)
    }

    /// The daemon is stopping: with a keeper, the lazy mounts stay for the next daemon
    /// (containers keep running, their reads wait); without one, they are unmounted.
    pub fn shutdown(&self) {
        if let Some(k) = &self.keeper {
            match k.list() {
                Ok(held) => {
                    tracing::info!(
                        mounts = held.len(),
                        "lazy mounts left to the keeper for the next daemon"
                    );
                    self.publisher_done.store(true, Ordering::SeqCst);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the keeper cannot be reached: unmounting the lazy mounts")
                }
            }
        }
        let ids: Vec<u64> = self
            .lazy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        for id in ids {
            self.drop_lazy(id);
        }
        self.publisher_done.store(true, Ordering::SeqCst);
    }
}

/// For the crash tests: `TESSERA_NODE_CRASH_AT=prepare` (a directory made, its record
/// not committed) or `commit` (the record committed, the work directory still there)
/// aborts the daemon at that point, as a `kill -9` there would. Only in builds with debug
/// assertions (the tests'): a release build never reads the variable, so no environment
/// left on a production node can make it abort.
#[cfg(not(debug_assertions))]
fn crash_point(_name: &str) {}

#[cfg(debug_assertions)]
fn crash_point(name: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("TESSERA_NODE_CRASH_AT").ok())
        .as_deref()
        == Some(name)
    {
        tracing::error!(point = name, "TESSERA_NODE_CRASH_AT: aborting here");
        std::process::abort();
    }
}

/// What the keeper calls the lazy mount of snapshot `id`.
fn keeper_name(id: u64) -> String {
    format!("snapshot-{id}")
}

/// The name of a snapshot the node created for a layer answered from a twin.
fn remote_name(id: u64) -> String {
    format!("tessera/remote/{id}")
}

fn join(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether a FUSE connection is still up (an aborted or unmounted one reports an error).
fn connection_alive(fd: &std::os::fd::OwnedFd) -> bool {
    use rustix::event::{PollFd, PollFlags};
    let mut fds = [PollFd::new(fd, PollFlags::empty())];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match rustix::event::poll(&mut fds, Some(&zero)) {
        Ok(_) => !fds[0]
            .revents()
            .intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL),
        Err(_) => false,
    }
}

fn is_mountpoint(dir: &Path) -> bool {
    // From mountinfo, never by looking at `dir`: a lazy mount whose daemon is gone and
    // whose connection the keeper holds would block the caller.
    tessera_mount::mount_dev(dir).is_some()
}

/// Disk bytes and inodes under `dir`, hard links counted once.
fn disk_usage(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    let (mut bytes, mut inodes) = (0i64, 0i64);
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            inodes += 1;
            bytes += (m.blocks() * 512) as i64;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}
