//! Regenerates the committed seed inputs under fuzz/seeds/<target>/ from the real
//! encoders, so the fuzzers start from valid packs and indexes:
//!
//!     cd fuzz && cargo run --example make_seeds
//!
//! The output is deterministic; re-run it when the format changes.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use tessera_format::index::{build_index, Index, Meta, StoredChunk, TreeKind, TreeNode};
use tessera_format::pack::{compress_chunk, verify_pack_bytes, PackWriter};
use tessera_format::Digest;

/// A version 2 pack whose frames each hold the chunks of one inner list.
fn framed_pack(frames: &[Vec<Vec<u8>>]) -> Vec<u8> {
    let mut w = PackWriter::new(Vec::new());
    for f in frames {
        let ids: Vec<(Digest, u32)> = f.iter().map(|c| (Digest::of(c), c.len() as u32)).collect();
        let (stored, raw) = compress_chunk(&f.concat(), 3).unwrap();
        w.append_frame(&ids, &stored, raw).unwrap();
    }
    let (bytes, _) = w.finish().unwrap();
    verify_pack_bytes(&bytes).unwrap();
    bytes
}

fn pack(chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut w = PackWriter::new(Vec::new());
    for c in chunks {
        let (stored, raw) = compress_chunk(c, 3).unwrap();
        w.append(Digest::of(c), c.len() as u32, &stored, raw).unwrap();
    }
    let (bytes, _) = w.finish().unwrap();
    verify_pack_bytes(&bytes).unwrap();
    bytes
}

/// Small deterministic pseudo-random bytes (incompressible, so stored raw).
fn noise(n: usize, mut s: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

fn node(mode: u32, kind: TreeKind) -> TreeNode {
    TreeNode {
        meta: Meta { mode, uid: 1000, gid: 1000, mtime: 1_700_000_000, mtime_nsec: 5, xattrs: vec![] },
        kind,
        link_group: None,
    }
}

fn path(p: &str) -> Vec<Vec<u8>> {
    p.split('/').filter(|s| !s.is_empty()).map(|s| s.as_bytes().to_vec()).collect()
}

fn sample_index() -> Index {
    let a = vec![b'a'; 3000];
    let b = noise(700, 7);
    let (da, db) = (Digest::of(&a), Digest::of(&b));
    let (pa, pb) = (Digest::of(b"pack-1"), Digest::of(b"pack-2"));
    let mut locs = BTreeMap::new();
    let dc = Digest::of(b"c");
    locs.insert(da, StoredChunk::alone(pa, 0, 20, 3000, false));
    locs.insert(db, StoredChunk::alone(pb, 0, 700, 700, true));
    // Two chunks of one frame.
    locs.insert(dc, StoredChunk { pack: pb, offset: 700, stored_len: 30, frame_len: 3001, inner: 3000, len: 1, raw: false });

    let mut tree = BTreeMap::new();
    tree.insert(path(""), node(0o755, TreeKind::Dir));
    tree.insert(path("bin"), node(0o755, TreeKind::Dir));
    let mut sh = node(0o4755, TreeKind::File { size: 3700, chunks: vec![da, db] });
    sh.link_group = Some(1);
    sh.meta.xattrs = vec![(b"security.capability".to_vec(), vec![1, 2, 3]), (b"user.x".to_vec(), vec![])];
    tree.insert(path("bin/sh"), sh.clone());
    tree.insert(path("bin/dash"), sh);
    tree.insert(path("bin/rsh"), node(0o777, TreeKind::Symlink(b"sh".to_vec())));
    tree.insert(path("dev"), node(0o755, TreeKind::Dir));
    tree.insert(path("dev/null"), node(0o666, TreeKind::CharDev(0x103)));
    tree.insert(path("dev/sda"), node(0o660, TreeKind::BlockDev(0x800)));
    tree.insert(path("run"), node(0o1777, TreeKind::Dir));
    tree.insert(path("run/fifo"), node(0o600, TreeKind::Fifo));
    tree.insert(path("run/sock"), node(0o600, TreeKind::Socket));
    tree.insert(path("empty"), node(0o644, TreeKind::File { size: 0, chunks: vec![] }));
    tree.insert(path("twice"), node(0o644, TreeKind::File { size: 6000, chunks: vec![da, da] }));
    tree.insert(path("c"), node(0o644, TreeKind::File { size: 1, chunks: vec![dc] }));
    build_index(&tree, &|d| locs.get(d).copied()).unwrap()
}

fn root_only() -> Index {
    let mut tree = BTreeMap::new();
    tree.insert(path(""), node(0o755, TreeKind::Dir));
    build_index(&tree, &|_| None).unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
    println!("{} ({} bytes)", dir.join(name).display(), bytes.len());
}

fn main() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");

    let p = seeds.join("pack_parse");
    write(&p, "empty", &pack(&[]));
    write(&p, "one_raw", &pack(&[noise(300, 1)]));
    write(&p, "one_zstd", &pack(&[vec![b'z'; 2000]]));
    write(&p, "mixed", &pack(&[vec![b'x'; 1500], noise(200, 2), b"hello, tessera\n".repeat(40)]));
    write(&p, "frames", &framed_pack(&[vec![vec![b'x'; 1500], noise(200, 3), b"hi\n".to_vec()], vec![noise(90, 4), noise(10, 5)]]));

    for (name, index) in [("root_only", root_only()), ("sample", sample_index())] {
        let bytes = index.encode().unwrap();
        assert_eq!(Index::decode(&bytes).unwrap(), index);
        write(&seeds.join("index_decode"), name, &bytes);
        // The body alone (what index_body wraps in a header and frame).
        let body = zstd::bulk::decompress(&bytes[20..], 1 << 20).unwrap();
        write(&seeds.join("index_body"), name, &body);
    }
}
