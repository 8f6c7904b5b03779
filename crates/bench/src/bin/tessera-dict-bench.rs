//! What per-chunk compression costs, and what zstd dictionaries win back (issue 12).
//!
//! Every corpus image is read from the corpus OCI layout: each gzip layer is decompressed,
//! its regular files are cut into chunks with tessera's chunker, and the chunks are
//! deduplicated as the converter does (first occurrence wins, across the image's layers;
//! one pack per layer). The stored bytes of those chunks are then measured under each
//! compression scheme, beside the peers of the same run:
//!
//! * `gzip`: the image's layers as the registry stores them;
//! * `zstd-whole`: each layer's uncompressed tar recompressed whole with zstd (level 3,
//!   the peer; streaming, one frame per layer);
//! * `chunk`: format v1, every chunk its own zstd frame, no dictionary (raw when that is
//!   not smaller);
//! * `pack-D`: a dictionary of D bytes trained per pack (layer) from a sample of its
//!   chunks, stored once per pack (counted), every chunk compressed with it;
//! * `image-D`: one dictionary per image, trained from a sample of all its chunks, shared by
//!   its packs (stored once);
//! * `first-D`: one dictionary trained on the first image only and reused for every later
//!   image (the "shared, content-addressed" option: later images pay nothing for it).
//!
//! Per image alone (no dedup between images) and for the whole corpus in one store (each
//! image stores only chunks no earlier image stored). Decompression throughput with and
//! without a dictionary is measured on the largest image. Frames written with a
//! dictionary omit zstd's 4-byte dictionary id (the index would say which dictionary).

#[path = "../common/harness.rs"]
mod harness;

use anyhow::{bail, Context, Result};
use clap::Parser;
use harness::{layout_blob, layout_digest, read_json};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tessera_format::Digest;

#[derive(Parser)]
#[command(
    about = "Per-chunk zstd compression with and without dictionaries, against whole-layer zstd and gzip, on the corpus",
    after_help = "Example:\n  cargo build --release -p tessera-bench\n  target/release/tessera-dict-bench --corpus /var/cache/tessera/corpus --json bench-dict.json\n\nNeeds the corpus (scripts/corpus.sh). Runs in memory: the largest image's chunks are held at once (about 0.5 GB for the corpus)."
)]
struct Args {
    /// Corpus directory: an OCI image layout in DIR/layout with one tag per image.
    #[arg(long, default_value = "/var/cache/tessera/corpus")]
    corpus: PathBuf,
    /// Images (tags of the layout), in the order they go into the one store.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "debian-base,debian-base-rebuilt,debian-python,debian-python-rebuilt,debian-gcc,app-pandas-a,app-pandas-b"
    )]
    images: Vec<String>,
    /// zstd level of every scheme (v1 writes level 3).
    #[arg(long, default_value_t = 3)]
    level: i32,
    /// Dictionary sizes (KiB) tried per pack and per image.
    #[arg(long, value_delimiter = ',', default_value = "16,64,112")]
    dict_kib: Vec<usize>,
    /// Frame groups (KiB) tried: consecutive small chunks of a pack compressed together in
    /// one frame of up to this many bytes (a chunk then needs its group's frame).
    #[arg(long, value_delimiter = ',', default_value = "64,128,256")]
    group_kib: Vec<usize>,
    /// Sample for training: this many times the dictionary size (zstd suggests ~100).
    #[arg(long, default_value_t = 100)]
    sample_factor: usize,
    /// Threads compressing chunks.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-dict.json")]
    json: PathBuf,
}

/// One layer's chunks (unique within the image, first occurrence, in order), with ids.
struct Pack {
    chunks: Vec<(Digest, Vec<u8>)>,
}

struct Image {
    gzip: u64,
    tar: u64,
    zstd_whole: u64,
    packs: Vec<Pack>,
}

fn read_image(layout: &Path, name: &str, level: i32) -> Result<Image> {
    let manifest = read_json(&layout_blob(layout, &layout_digest(layout, name)?)?)?;
    let layers = manifest["layers"].as_array().context("manifest layers")?;
    let mut img = Image {
        gzip: 0,
        tar: 0,
        zstd_whole: 0,
        packs: Vec::new(),
    };
    let mut in_image: HashSet<Digest> = HashSet::new();
    for l in layers {
        let digest = l["digest"].as_str().context("layer digest")?;
        let path = layout_blob(layout, digest)?;
        img.gzip += std::fs::metadata(&path)?.len();
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&path)?)
            .read_to_end(&mut tar_bytes)
            .with_context(|| format!("gunzip {digest}"))?;
        img.tar += tar_bytes.len() as u64;
        img.zstd_whole += zstd::bulk::compress(&tar_bytes, level)?.len() as u64;
        let mut pack = Pack { chunks: Vec::new() };
        let mut ar = tar::Archive::new(&tar_bytes[..]);
        for e in ar.entries()? {
            let mut e = e?;
            if e.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            for (off, len, id) in tessera_format::chunker::chunk_bytes(&data) {
                if in_image.insert(id) {
                    pack.chunks
                        .push((id, data[off as usize..off as usize + len].to_vec()));
                }
            }
        }
        img.packs.push(pack);
    }
    Ok(img)
}

/// Bytes of `chunks` each compressed alone (with `dict` if any; raw when not smaller),
/// on `threads` threads.
fn per_chunk(chunks: &[&[u8]], level: i32, dict: Option<&[u8]>, threads: usize) -> Result<u64> {
    let part = chunks.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .chunks(part)
            .map(|part| {
                s.spawn(move || -> Result<u64> {
                    let mut c = match dict {
                        Some(d) => zstd::bulk::Compressor::with_dictionary(level, d)?,
                        None => zstd::bulk::Compressor::new(level)?,
                    };
                    if dict.is_some() {
                        c.set_parameter(zstd::zstd_safe::CParameter::DictIdFlag(false))?;
                    }
                    let mut n = 0u64;
                    for ch in part {
                        let z = c.compress(ch)?;
                        n += z.len().min(ch.len()) as u64;
                    }
                    Ok(n)
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h
                .join()
                .map_err(|_| anyhow::anyhow!("a compressing thread panicked"))??;
        }
        Ok(total)
    })
}

/// A dictionary of `size` bytes trained on evenly spaced chunks of `chunks` (up to
/// `factor × size` bytes of samples); None when there is too little to train on.
fn train(chunks: &[&[u8]], size: usize, factor: usize) -> Option<Vec<u8>> {
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let want = (size * factor).min(total);
    if want < size * 4 || chunks.len() < 8 {
        return None;
    }
    let step = (total as f64 / want as f64).max(1.0);
    let (mut samples, mut next, mut pos) = (Vec::new(), 0.0f64, 0usize);
    for c in chunks {
        if pos as f64 >= next {
            samples.push(*c);
            next += step * c.len() as f64;
        }
        pos += c.len();
    }
    zstd::dict::from_samples(&samples, size).ok()
}

#[derive(Default, Clone, Copy)]
struct Tally {
    bytes: u64,
    dict_bytes: u64,
    train_s: f64,
    compress_s: f64,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.bytes += o.bytes;
        self.dict_bytes += o.dict_bytes;
        self.train_s += o.train_s;
        self.compress_s += o.compress_s;
    }
    fn total(&self) -> u64 {
        self.bytes + self.dict_bytes
    }
    fn json(&self) -> Value {
        json!({"bytes": self.total(), "frames": self.bytes, "dictionaries": self.dict_bytes,
               "train_seconds": self.train_s, "compress_seconds": self.compress_s})
    }
}

/// Every scheme over `packs` (each a list of chunks); `first` is the first image's
/// dictionary per size (for `first-D`).
fn schemes(
    packs: &[Vec<&[u8]>],
    a: &Args,
    first: &[(usize, Vec<u8>)],
) -> Result<Vec<(String, Tally)>> {
    let mut out = Vec::new();
    let all: Vec<&[u8]> = packs.iter().flatten().copied().collect();
    let t = Instant::now();
    let bytes = per_chunk(&all, a.level, None, a.threads)?;
    out.push((
        "chunk".to_string(),
        Tally {
            bytes,
            compress_s: t.elapsed().as_secs_f64(),
            ..Tally::default()
        },
    ));
    for &kib in &a.dict_kib {
        let size = kib << 10;
        let mut pack = Tally::default();
        for p in packs {
            let t = Instant::now();
            let dict = train(p, size, a.sample_factor);
            let train_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let bytes = per_chunk(p, a.level, dict.as_deref(), a.threads)?;
            pack.add(Tally {
                bytes,
                dict_bytes: dict.as_ref().map_or(0, |d| d.len() as u64),
                train_s,
                compress_s: t.elapsed().as_secs_f64(),
            });
        }
        out.push((format!("pack-{kib}"), pack));
        let t = Instant::now();
        let dict = train(&all, size, a.sample_factor);
        let train_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let bytes = per_chunk(&all, a.level, dict.as_deref(), a.threads)?;
        out.push((
            format!("image-{kib}"),
            Tally {
                bytes,
                dict_bytes: dict.as_ref().map_or(0, |d| d.len() as u64),
                train_s,
                compress_s: t.elapsed().as_secs_f64(),
            },
        ));
    }
    // Groups: consecutive chunks of a pack concatenated up to G bytes, one frame each;
    // without a dictionary and with the image's largest one.
    let big = a.dict_kib.iter().max().copied();
    let image_dict = match big {
        Some(kib) => train(&all, kib << 10, a.sample_factor),
        None => None,
    };
    for &g in &a.group_kib {
        let limit = g << 10;
        let mut frames: Vec<Vec<u8>> = Vec::new();
        for p in packs {
            let mut cur: Vec<u8> = Vec::new();
            for c in p {
                if !cur.is_empty() && cur.len() + c.len() > limit {
                    frames.push(std::mem::take(&mut cur));
                }
                cur.extend_from_slice(c);
            }
            if !cur.is_empty() {
                frames.push(cur);
            }
        }
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        let t = Instant::now();
        let bytes = per_chunk(&refs, a.level, None, a.threads)?;
        out.push((
            format!("group-{g}"),
            Tally {
                bytes,
                compress_s: t.elapsed().as_secs_f64(),
                ..Tally::default()
            },
        ));
        if let (Some(kib), Some(d)) = (big, &image_dict) {
            let t = Instant::now();
            let bytes = per_chunk(&refs, a.level, Some(d), a.threads)?;
            out.push((
                format!("group-{g}+image-{kib}"),
                Tally {
                    bytes,
                    dict_bytes: d.len() as u64,
                    compress_s: t.elapsed().as_secs_f64(),
                    ..Tally::default()
                },
            ));
        }
    }
    for (kib, dict) in first {
        let t = Instant::now();
        let bytes = per_chunk(&all, a.level, Some(dict), a.threads)?;
        out.push((
            format!("first-{kib}"),
            Tally {
                bytes,
                compress_s: t.elapsed().as_secs_f64(),
                ..Tally::default()
            },
        ));
    }
    Ok(out)
}

/// MB/s decompressing every chunk of `chunks` (compressed first) with and without `dict`.
fn decode_speed(chunks: &[&[u8]], level: i32, dict: &[u8]) -> Result<(f64, f64)> {
    let mut rates = Vec::new();
    for d in [None, Some(dict)] {
        let mut c = match d {
            Some(d) => zstd::bulk::Compressor::with_dictionary(level, d)?,
            None => zstd::bulk::Compressor::new(level)?,
        };
        let frames: Vec<(Vec<u8>, usize)> = chunks
            .iter()
            .map(|ch| c.compress(ch).map(|z| (z, ch.len())))
            .collect::<std::io::Result<_>>()?;
        let mut dec = match d {
            Some(d) => zstd::bulk::Decompressor::with_dictionary(d)?,
            None => zstd::bulk::Decompressor::new()?,
        };
        let t = Instant::now();
        let mut n = 0usize;
        for (z, len) in &frames {
            n += dec.decompress(z, *len)?.len();
        }
        rates.push(n as f64 / 1e6 / t.elapsed().as_secs_f64());
    }
    Ok((rates[0], rates[1]))
}

fn mb(n: u64) -> String {
    format!("{:.1} MB", n as f64 / 1e6)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let layout = a.corpus.join("layout");
    if !layout.join("index.json").exists() {
        bail!(
            "no corpus layout at {}: build the corpus with scripts/corpus.sh",
            layout.display()
        );
    }
    let started = Instant::now();
    let mut seen: HashSet<Digest> = HashSet::new();
    let mut first: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut rows = Vec::new();
    let mut alone_total: std::collections::BTreeMap<String, Tally> = Default::default();
    let mut store_total: std::collections::BTreeMap<String, Tally> = Default::default();
    let (mut gzip_all, mut zstd_all, mut tar_all) = (0u64, 0u64, 0u64);
    let mut gzip_unique = 0u64;
    let mut layers_seen: HashSet<String> = HashSet::new();
    let mut decode = None;
    for name in &a.images {
        let t = Instant::now();
        let img = read_image(&layout, name, a.level)?;
        eprintln!(
            "[{name}] read: {} layers, {} of tar, {} chunks stored alone ({:.1} s)",
            img.packs.len(),
            mb(img.tar),
            img.packs.iter().map(|p| p.chunks.len()).sum::<usize>(),
            t.elapsed().as_secs_f64()
        );
        let manifest = read_json(&layout_blob(&layout, &layout_digest(&layout, name)?)?)?;
        for l in manifest["layers"].as_array().context("layers")? {
            if layers_seen.insert(l["digest"].as_str().unwrap_or_default().to_string()) {
                gzip_unique += l["size"].as_u64().unwrap_or(0);
            }
        }
        gzip_all += img.gzip;
        zstd_all += img.zstd_whole;
        tar_all += img.tar;
        let packs: Vec<Vec<&[u8]>> = img
            .packs
            .iter()
            .map(|p| p.chunks.iter().map(|(_, c)| c.as_slice()).collect())
            .collect();
        if first.is_empty() {
            let all: Vec<&[u8]> = packs.iter().flatten().copied().collect();
            for &kib in &a.dict_kib {
                if let Some(d) = train(&all, kib << 10, a.sample_factor) {
                    first.push((kib, d));
                }
            }
        }
        let alone = schemes(&packs, &a, &first)?;
        // The one store: only the chunks no earlier image stored.
        let mut new_packs: Vec<Vec<&[u8]>> = Vec::new();
        let mut in_store = seen.clone();
        for p in &img.packs {
            let mut np = Vec::new();
            for (id, c) in &p.chunks {
                if in_store.insert(*id) {
                    np.push(c.as_slice());
                }
            }
            if !np.is_empty() {
                new_packs.push(np);
            }
        }
        let stored = schemes(&new_packs, &a, &first)?;
        seen = in_store;
        if decode.is_none() && name == "debian-gcc" {
            if let Some((_, d)) = first.iter().find(|(k, _)| *k == 64) {
                let all: Vec<&[u8]> = packs.iter().flatten().copied().collect();
                decode = Some(decode_speed(&all, a.level, d)?);
            }
        }
        let chunk = alone[0].1.total();
        eprintln!(
            "[{name}] alone: gzip {}, zstd-whole {}, chunk {} ({:.3}× zstd-whole); {}",
            mb(img.gzip),
            mb(img.zstd_whole),
            mb(chunk),
            chunk as f64 / img.zstd_whole as f64,
            alone
                .iter()
                .skip(1)
                .map(|(n, t)| format!("{n} {:.3}×", t.total() as f64 / img.zstd_whole as f64))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (n, t) in &alone {
            alone_total.entry(n.clone()).or_default().add(*t);
        }
        for (n, t) in &stored {
            store_total.entry(n.clone()).or_default().add(*t);
        }
        rows.push(json!({
            "image": name, "gzip": img.gzip, "tar": img.tar, "zstd_whole": img.zstd_whole,
            "alone": alone.iter().map(|(n, t)| (n.clone(), t.json())).collect::<serde_json::Map<_, _>>(),
            "one_store_added": stored.iter().map(|(n, t)| (n.clone(), t.json())).collect::<serde_json::Map<_, _>>(),
        }));
    }

    println!(
        "\n| scheme (level {}) | every image alone: stored | / zstd-whole ({}) | / gzip ({}) | whole corpus, one store | / unique gzip layers ({}) | compress CPU s (alone) | train s (alone) |",
        a.level,
        mb(zstd_all),
        mb(gzip_all),
        mb(gzip_unique)
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut order: Vec<&String> = alone_total.keys().collect();
    order.sort_by_key(|n| alone_total[*n].total());
    for n in order {
        let (al, st) = (alone_total[n], store_total[n]);
        println!(
            "| {n} | {} | {:.3} | {:.3} | {} | {:.3} | {:.1} | {:.1} |",
            mb(al.total()),
            al.total() as f64 / zstd_all as f64,
            al.total() as f64 / gzip_all as f64,
            mb(st.total()),
            st.total() as f64 / gzip_unique as f64,
            al.compress_s,
            al.train_s
        );
    }
    if let Some((plain, with)) = decode {
        println!(
            "\ndecompression, debian-gcc's chunks one by one: {plain:.0} MB/s without a dictionary, {with:.0} MB/s with first-64 ({:.2}×)",
            with / plain
        );
    }
    let out = json!({
        "settings": {"images": a.images, "level": a.level, "dict_kib": a.dict_kib, "sample_factor": a.sample_factor},
        "totals": {"gzip": gzip_all, "gzip_unique_layers": gzip_unique, "zstd_whole": zstd_all, "tar": tar_all},
        "alone": alone_total.iter().map(|(n, t)| (n.clone(), t.json())).collect::<serde_json::Map<_, _>>(),
        "one_store": store_total.iter().map(|(n, t)| (n.clone(), t.json())).collect::<serde_json::Map<_, _>>(),
        "decode_mb_per_s": decode.map(|(p, w)| json!({"plain": p, "first_64": w})),
        "images": rows,
        "seconds": started.elapsed().as_secs_f64(),
    });
    std::fs::write(&a.json, serde_json::to_vec_pretty(&out)?)
        .with_context(|| format!("writing {}", a.json.display()))?;
    eprintln!("JSON written to {}", a.json.display());
    Ok(())
}
