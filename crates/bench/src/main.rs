//! `tessera-bench convert`: storage and conversion figures for the image corpus, with
//! nydus-image (RAFS v6, zstd, --chunk-dict) and plain OCI layer storage measured in the
//! same run on the same inputs. Prints a Markdown table and writes JSON.
//!
//! With `--format-only` it measures the storage format alone, against the same layers
//! recompressed whole with zstd -3 (the peer of format v2, issue 12) and their gzip
//! layers, and against a `--baseline` tessera binary (an earlier build) in the same run.
//!
//! Every figure is measured here; nothing is copied from elsewhere. Peak RSS comes from
//! GNU time (`%M`) around each converter process.

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Parser)]
#[command(
    about = "tessera conversion and storage benchmark against nydus-image and OCI layers",
    after_help = "Example:
  cargo run --release -p tessera-bench -- --corpus /var/cache/tessera/corpus --work /var/tmp/tessera-bench
  tessera-bench --format-only --baseline /path/to/older/tessera --json bench-format.json"
)]
struct Args {
    /// Corpus directory (scripts/corpus.sh output).
    #[arg(long, default_value = "/var/cache/tessera/corpus")]
    corpus: PathBuf,
    /// Scratch directory (emptied first).
    #[arg(long, default_value = "/var/tmp/tessera-bench")]
    work: PathBuf,
    /// The tessera binary (default: next to this one).
    #[arg(long)]
    tessera: Option<PathBuf>,
    /// The nydus-image binary.
    #[arg(long, default_value = "nydus-image")]
    nydus_image: String,
    /// Size in GB of the synthetic image for the peak-RSS row (0 skips it).
    #[arg(long, default_value_t = 5.0)]
    big_gb: f64,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-convert.json")]
    json: PathBuf,
    /// Only the storage-format rows: every corpus image converted alone and the corpus in
    /// one store, against zstd -3 whole layers and gzip layers (no nydus-image needed).
    #[arg(long)]
    format_only: bool,
    /// An earlier tessera binary measured beside this one in the format rows (e.g. a
    /// build of the commit before a format change).
    #[arg(long)]
    baseline: Option<PathBuf>,
}

/// One measured process run.
#[derive(Debug, Clone, Serialize)]
struct Run {
    seconds: f64,
    max_rss_kb: u64,
}

fn timed(cmd: &mut Command) -> Result<Run> {
    let mut full = Command::new("/usr/bin/time");
    full.arg("-f")
        .arg("TIME %e %M")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    let t0 = Instant::now();
    let out = full.output().with_context(|| {
        format!("running {cmd:?} (is GNU time installed? apt-get install time)")
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "{cmd:?} failed:\n{}",
            stderr
                .chars()
                .rev()
                .take(3000)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>()
        );
    }
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("TIME "))
        .context("no GNU time output")?;
    let rss = line
        .split_whitespace()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(Run {
        seconds: secs,
        max_rss_kb: rss,
    })
}

fn dir_bytes(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                n += dir_bytes(&e.path());
            } else {
                n += m.len();
            }
        }
    }
    n
}

fn read_json(p: &Path) -> Result<Value> {
    Ok(serde_json::from_slice(
        &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
    )?)
}

/// Layer tars of a docker archive, extracted once (inputs for nydus-image tar-rafs).
fn extract_archive(archive: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.join("manifest.json").exists() {
        std::fs::create_dir_all(dir)?;
        let st = Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(dir)
            .status()?;
        if !st.success() {
            bail!("extracting {}", archive.display());
        }
    }
    let m = read_json(&dir.join("manifest.json"))?;
    Ok(m[0]["Layers"]
        .as_array()
        .context("manifest.json Layers")?
        .iter()
        .filter_map(|l| l.as_str())
        .map(|l| dir.join(l))
        .collect())
}

/// `nydus-image create` for one layer tar: RAFS v6, zstd (append the tar path).
fn nydus_create(nydus: &str, blobs: &Path, boot: &Path) -> Command {
    let mut c = Command::new(nydus);
    c.args([
        "create",
        "-t",
        "tar-rafs",
        "--fs-version",
        "6",
        "--compressor",
        "zstd",
        "--log-level",
        "warn",
    ])
    .arg("-D")
    .arg(blobs)
    .arg("-B")
    .arg(boot);
    c
}

/// The corpus images, in the order they are added to one store.
const IMAGES: [&str; 7] = [
    "debian-base",
    "debian-python",
    "debian-gcc",
    "app-pandas-a",
    "app-pandas-b",
    "debian-base-rebuilt",
    "debian-python-rebuilt",
];

/// Bytes of `path` compressed whole at zstd `level` (streamed: memory stays small).
fn zstd_whole(path: &Path, level: i32) -> Result<u64> {
    struct Count(u64);
    impl Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut enc = zstd::stream::write::Encoder::new(Count(0), level)?;
    std::io::copy(
        &mut std::fs::File::open(path).with_context(|| format!("{}", path.display()))?,
        &mut enc,
    )?;
    Ok(enc.finish()?.0)
}

/// Bytes of an image's gzip layers (from the corpus summary).
fn gzip_layers(summary: &Value, img: &str) -> u64 {
    layer_bytes(summary, img, false)
}

/// The storage-format rows: each image alone, and the corpus in one store, for this
/// tessera and the baseline, beside zstd -3 whole layers and gzip layers.
fn format_rows(ctx: &Ctx, baseline: Option<&Path>, summary: &Value) -> Result<(String, Value)> {
    let mut bins: Vec<(&str, PathBuf)> = vec![("tessera", ctx.tessera.clone())];
    if let Some(b) = baseline {
        bins.push(("baseline", b.to_path_buf()));
    }
    let mut t = String::new();
    t.push_str("| image (converted alone) | gzip layers | zstd -3 whole layers | tessera | × zstd whole | × gzip |");
    if baseline.is_some() {
        t.push_str(" baseline | tessera / baseline |");
    }
    t.push('\n');
    t.push_str("|---|---:|---:|---:|---:|---:|");
    if baseline.is_some() {
        t.push_str("---:|---:|");
    }
    t.push('\n');
    let mut rows = Vec::new();
    let (mut sum_gzip, mut sum_zstd) = (0u64, 0u64);
    let mut sums = vec![0u64; bins.len()];
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); bins.len()];
    for img in IMAGES {
        eprintln!("format: {img} alone");
        let layers = extract_archive(
            &ctx.corpus.join("docker-archive").join(format!("{img}.tar")),
            &ctx.work.join("layers").join(img),
        )?;
        let mut zstd = 0;
        for l in &layers {
            zstd += zstd_whole(l, 3)?;
        }
        let gzip = gzip_layers(summary, img);
        let mut stored = Vec::new();
        for (k, (name, bin)) in bins.iter().enumerate() {
            let store = ctx.work.join("alone").join(name).join(img);
            let _ = std::fs::remove_dir_all(&store);
            let c = Ctx {
                tessera: bin.clone(),
                nydus: ctx.nydus.clone(),
                work: ctx.work.clone(),
                corpus: ctx.corpus.clone(),
            };
            let r = c.ours(&store, img, img, &[])?;
            let b = dir_bytes(&store.join("blobs"));
            let _ = std::fs::remove_dir_all(&store);
            sums[k] += b;
            runs[k].push(r);
            stored.push(b);
        }
        sum_gzip += gzip;
        sum_zstd += zstd;
        t.push_str(&format!(
            "| {img} | {} | {} | {} | {:.3} | {:.3} |",
            mb(gzip),
            mb(zstd),
            mb(stored[0]),
            stored[0] as f64 / zstd.max(1) as f64,
            stored[0] as f64 / gzip.max(1) as f64
        ));
        if stored.len() > 1 {
            t.push_str(&format!(
                " {} | {:.3} |",
                mb(stored[1]),
                stored[0] as f64 / stored[1].max(1) as f64
            ));
        }
        t.push('\n');
        rows.push(json!({"image": img, "gzip": gzip, "zstd_whole": zstd, "stored": stored}));
    }
    t.push_str(&format!(
        "| **all 7, each alone** | {} | {} | {} | **{:.3}** (target ≤ 1.03) | **{:.3}** (target ≤ 0.85) |",
        mb(sum_gzip),
        mb(sum_zstd),
        mb(sums[0]),
        sums[0] as f64 / sum_zstd.max(1) as f64,
        sums[0] as f64 / sum_gzip.max(1) as f64
    ));
    if sums.len() > 1 {
        t.push_str(&format!(
            " {} | {:.3} |",
            mb(sums[1]),
            sums[0] as f64 / sums[1].max(1) as f64
        ));
    }
    t.push('\n');
    // The corpus in one store, each image deduplicated against the ones before.
    let mut uniq = BTreeSet::new();
    let mut oci_unique = 0u64;
    for i in summary["images"].as_array().into_iter().flatten() {
        for l in i["layers"].as_array().into_iter().flatten() {
            if uniq.insert(l["digest"].as_str().unwrap_or_default().to_string()) {
                oci_unique += l["size"].as_u64().unwrap_or(0);
            }
        }
    }
    let mut input = 0u64;
    for img in IMAGES {
        input += uncompressed_bytes(summary, img);
    }
    let mut corpus = Vec::new();
    let mut conv = Vec::new();
    for (name, bin) in &bins {
        eprintln!("format: the corpus in one store ({name})");
        let store = ctx.work.join("one-store").join(name);
        let _ = std::fs::remove_dir_all(&store);
        let c = Ctx {
            tessera: bin.clone(),
            nydus: ctx.nydus.clone(),
            work: ctx.work.clone(),
            corpus: ctx.corpus.clone(),
        };
        let (mut secs, mut rss) = (0.0, 0u64);
        for (i, img) in IMAGES.iter().enumerate() {
            let r = c.ours(&store, img, img, &IMAGES[..i])?;
            secs += r.seconds;
            rss = rss.max(r.max_rss_kb);
        }
        corpus.push(dir_bytes(&store.join("blobs")));
        conv.push(Run {
            seconds: secs,
            max_rss_kb: rss,
        });
        let _ = std::fs::remove_dir_all(&store);
    }
    t.push_str(&format!(
        "\n| figure | tessera |{} target |\n|---|---:|{}---|\n",
        if bins.len() > 1 {
            " baseline | tessera / baseline |"
        } else {
            ""
        },
        if bins.len() > 1 { "---:|---:|" } else { "" }
    ));
    let cell = |v: &[f64], f: &dyn Fn(f64) -> String| -> String {
        if v.len() > 1 {
            format!("{} | {} | {:.3} |", f(v[0]), f(v[1]), v[0] / v[1].max(1e-9))
        } else {
            format!("{} |", f(v[0]))
        }
    };
    t.push_str(&format!(
        "| all 7 corpus images, one store (× unique gzip layers {}) | {} ≤ 0.65× |\n",
        mb(oci_unique),
        cell(
            &corpus
                .iter()
                .map(|&b| b as f64 / oci_unique as f64)
                .collect::<Vec<_>>(),
            &|x| format!("{x:.3}×")
        )
    ));
    let alone_secs: Vec<f64> = runs
        .iter()
        .map(|r| r.iter().map(|x| x.seconds).sum())
        .collect();
    t.push_str(&format!(
        "| conversion throughput, each image alone (MB/s of uncompressed layers) | {} within ±5% of baseline |\n",
        cell(
            &alone_secs.iter().map(|s| input as f64 / 1e6 / s.max(1e-9)).collect::<Vec<_>>(),
            &|x| format!("{x:.0}")
        )
    ));
    t.push_str(&format!(
        "| conversion throughput, one store (MB/s) | {} within ±5% of baseline |\n",
        cell(
            &conv
                .iter()
                .map(|r| input as f64 / 1e6 / r.seconds.max(1e-9))
                .collect::<Vec<_>>(),
            &|x| format!("{x:.0}")
        )
    ));
    let rss: Vec<f64> = runs
        .iter()
        .zip(&conv)
        .map(|(r, c)| {
            r.iter()
                .map(|x| x.max_rss_kb)
                .max()
                .unwrap_or(0)
                .max(c.max_rss_kb) as f64
                / 1024.0
        })
        .collect();
    t.push_str(&format!(
        "| peak RSS of a conversion (MiB) | {} within ±5% of baseline |\n",
        cell(&rss, &|x| format!("{x:.0}"))
    ));
    let j = json!({"alone": rows, "alone_total": sums, "gzip_total": sum_gzip, "zstd_whole_total": sum_zstd,
                   "one_store": corpus, "oci_unique_gzip": oci_unique, "input_uncompressed": input,
                   "alone_seconds": alone_secs, "one_store_runs": conv, "peak_rss_mib": rss});
    Ok((t, j))
}

struct Ctx {
    tessera: PathBuf,
    nydus: String,
    work: PathBuf,
    corpus: PathBuf,
}

impl Ctx {
    /// tessera: convert image `img` (docker archive) into `store`, dedup against `dict` tags.
    fn ours(&self, store: &Path, img: &str, tag: &str, dict: &[&str]) -> Result<Run> {
        let mut c = Command::new(&self.tessera);
        c.arg("--no-progress")
            .arg("convert")
            .arg("--no-cache")
            .arg(format!(
                "docker-archive:{}",
                self.corpus
                    .join("docker-archive")
                    .join(format!("{img}.tar"))
                    .display()
            ))
            .arg(format!("oci:{}:{tag}", store.display()));
        for d in dict {
            c.arg("--dedup-with")
                .arg(format!("oci:{}:{d}", store.display()));
        }
        timed(&mut c)
    }

    /// nydus-image, the way nydusify converts an image: every layer on its own
    /// (tar-rafs, RAFS v6, zstd) into `blobs`, deduplicated against `dict`, then the layer
    /// bootstraps merged into the image bootstrap. Returns the run (times summed, max
    /// RSS) and the image bootstrap (which is what the image stores besides its blobs).
    fn nydus(
        &self,
        blobs: &Path,
        img: &str,
        tag: &str,
        dict: Option<&Path>,
    ) -> Result<(Run, PathBuf)> {
        let layers = extract_archive(
            &self
                .corpus
                .join("docker-archive")
                .join(format!("{img}.tar")),
            &self.work.join("layers").join(img),
        )?;
        std::fs::create_dir_all(blobs)?;
        let scratch = self.work.join("nydus-layer-boots").join(tag);
        std::fs::create_dir_all(&scratch)?;
        let mut boots = Vec::new();
        let mut total = Run {
            seconds: 0.0,
            max_rss_kb: 0,
        };
        let mut add = |r: Run| {
            total.seconds += r.seconds;
            total.max_rss_kb = total.max_rss_kb.max(r.max_rss_kb);
        };
        for (i, l) in layers.iter().enumerate() {
            let boot = scratch.join(format!("layer{i}.boot"));
            let mut c = nydus_create(&self.nydus, blobs, &boot);
            if let Some(d) = dict {
                c.arg("--chunk-dict")
                    .arg(format!("bootstrap={}", d.display()));
            }
            c.arg(l);
            add(timed(&mut c)?);
            boots.push(boot);
        }
        let image_boot = blobs.join(format!("{tag}.bootstrap"));
        let mut c = Command::new(&self.nydus);
        c.args(["merge", "--log-level", "warn"])
            .arg("-B")
            .arg(&image_boot)
            .arg("-D")
            .arg(blobs);
        if let Some(d) = dict {
            // Layer bootstraps that reference dictionary blobs merge only with the dict.
            c.arg("--chunk-dict")
                .arg(format!("bootstrap={}", d.display()));
        }
        c.args(&boots);
        add(timed(&mut c)?);
        let _ = std::fs::remove_dir_all(&scratch);
        Ok((total, image_boot))
    }
}

fn uncompressed_bytes(summary: &Value, img: &str) -> u64 {
    summary["images"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == img)
        .and_then(|i| i["uncompressed_total"].as_u64())
        .unwrap_or(0)
}

fn layer_bytes(summary: &Value, img: &str, last: bool) -> u64 {
    let Some(i) = summary["images"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == img)
    else {
        return 0;
    };
    let layers = i["layers"].as_array().cloned().unwrap_or_default();
    if last {
        layers.last().and_then(|l| l["size"].as_u64()).unwrap_or(0)
    } else {
        layers.iter().filter_map(|l| l["size"].as_u64()).sum()
    }
}

fn mb(n: u64) -> String {
    format!("{:.1} MB", n as f64 / 1e6)
}

/// Pair: store A, then B deduplicated against A; bytes B adds to each store.
fn pair(ctx: &Ctx, a: &str, b: &str) -> Result<Value> {
    let dir = ctx.work.join(format!("pair-{a}-{b}"));
    let _ = std::fs::remove_dir_all(&dir);
    let store = dir.join("tessera");
    ctx.ours(&store, a, "a", &[])?;
    let before = dir_bytes(&store.join("blobs"));
    ctx.ours(&store, b, "b", &["a"])?;
    let ours_added = dir_bytes(&store.join("blobs")) - before;
    let nb = dir.join("nydus");
    let (_, boot_a) = ctx.nydus(&nb, a, "a", None)?;
    let before = dir_bytes(&nb);
    ctx.nydus(&nb, b, "b", Some(&boot_a))?;
    let nydus_added = dir_bytes(&nb) - before;
    Ok(json!({"a": a, "b": b, "tessera_added": ours_added, "nydus_added": nydus_added}))
}

fn write_big_image(dir: &Path, gb: f64) -> Result<PathBuf> {
    // A docker-archive with one uncompressed layer of `gb` GB: files of text-like,
    // partly repetitive data (compresses about 3:1 with zstd, like binaries and libraries).
    let archive = dir.join("big.tar");
    if archive.exists() {
        return Ok(archive);
    }
    std::fs::create_dir_all(dir)?;
    let layer = dir.join("layer.tar");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&layer)?);
        let total = (gb * 1e9) as u64;
        let file_size: u64 = 64 << 20;
        let mut seed = 0x1234_5678_9abc_def0u64;
        let words: Vec<String> = (0..4096)
            .map(|i| format!("sym{i:05x}_{} ", i * 7919 % 104729))
            .collect();
        let mut written = 0u64;
        let mut n = 0;
        while written < total {
            let mut data = Vec::with_capacity(file_size as usize);
            while (data.len() as u64) < file_size {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                if seed.is_multiple_of(4) {
                    data.extend_from_slice(&seed.to_le_bytes());
                } else {
                    data.extend_from_slice(words[(seed >> 20) as usize % words.len()].as_bytes());
                }
            }
            data.truncate(file_size as usize);
            let name = format!("data/file{n:04}.bin");
            let mut h = [0u8; 512];
            h[..name.len()].copy_from_slice(name.as_bytes());
            h[100..107].copy_from_slice(b"0000644");
            h[108..115].copy_from_slice(b"0000000");
            h[116..123].copy_from_slice(b"0000000");
            h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
            h[136..147].copy_from_slice(b"14560000000");
            h[156] = b'0';
            h[257..263].copy_from_slice(b"ustar\0");
            h[263..265].copy_from_slice(b"00");
            h[148..156].copy_from_slice(b"        ");
            let sum: u32 = h.iter().map(|&b| b as u32).sum();
            h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
            f.write_all(&h)?;
            f.write_all(&data)?;
            let pad = (512 - data.len() % 512) % 512;
            f.write_all(&vec![0u8; pad])?;
            written += data.len() as u64;
            n += 1;
        }
        f.write_all(&[0u8; 1024])?;
        f.flush()?;
    }
    // Wrap into a docker archive with GNU tar.
    let cfg = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}});
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&cfg)?)?;
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec(
            &json!([{"Config": "config.json", "RepoTags": ["big:latest"], "Layers": ["layer.tar"]}]),
        )?,
    )?;
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(dir)
        .args(["manifest.json", "config.json", "layer.tar"])
        .status()?;
    if !st.success() {
        bail!("creating {}", archive.display());
    }
    Ok(archive)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let tessera = match &args.tessera {
        Some(t) => t.clone(),
        None => std::env::current_exe()?.with_file_name("tessera"),
    };
    if !tessera.exists() {
        bail!(
            "{} not found: build it with `cargo build --release` first",
            tessera.display()
        );
    }
    if args.format_only {
        let summary = read_json(&args.corpus.join("summary.json"))
            .context("corpus summary (run scripts/corpus.sh)")?;
        std::fs::create_dir_all(&args.work)?;
        let ctx = Ctx {
            tessera,
            nydus: args.nydus_image.clone(),
            work: args.work.clone(),
            corpus: args.corpus.clone(),
        };
        let (table, j) = format_rows(&ctx, args.baseline.as_deref(), &summary)?;
        println!("{table}");
        std::fs::write(
            &args.json,
            serde_json::to_vec_pretty(&json!({"format": j, "table_markdown": table}))?,
        )?;
        eprintln!("JSON written to {}", args.json.display());
        return Ok(());
    }
    if Command::new(&args.nydus_image)
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("{} not found: install it with `apt-get install cmake && cargo install nydus-rs --locked`", args.nydus_image);
    }
    let summary = read_json(&args.corpus.join("summary.json"))
        .context("corpus summary (run scripts/corpus.sh)")?;
    let _ = std::fs::remove_dir_all(args.work.join("pair-debian-base-debian-base-rebuilt"));
    std::fs::create_dir_all(&args.work)?;
    let ctx = Ctx {
        tessera,
        nydus: args.nydus_image.clone(),
        work: args.work.clone(),
        corpus: args.corpus.clone(),
    };
    let mut results = serde_json::Map::new();
    let mut table = String::new();
    table.push_str("| figure | tessera | nydus-image | ratio (tessera/nydus) | target |\n|---|---:|---:|---:|---|\n");

    // 1. Pairs.
    let pairs = [
        ("debian-base", "debian-base-rebuilt", false),
        ("app-pandas-a", "app-pandas-b", true),
        ("debian-base", "debian-python", true),
        ("debian-python", "debian-python-rebuilt", false),
    ];
    let mut pair_json = Vec::new();
    for (a, b, last) in pairs {
        eprintln!("pair {a} -> {b}");
        let p = pair(&ctx, a, b)?;
        let t = p["tessera_added"].as_u64().unwrap_or(0);
        let n = p["nydus_added"].as_u64().unwrap_or(0);
        let reference = layer_bytes(&summary, b, last);
        let what = if last {
            "its new layer (gzip)"
        } else {
            "its layers (gzip)"
        };
        table.push_str(&format!(
            "| bytes {b} adds on top of {a} | {} ({:.1}% of {what}) | {} | {:.2} | ≤ nydus{} |\n",
            mb(t),
            100.0 * t as f64 / reference.max(1) as f64,
            mb(n),
            t as f64 / n.max(1) as f64,
            match b {
                "debian-base-rebuilt" => "; ≤ 1% of its size",
                "app-pandas-b" => "; ≤ 50% of its layer",
                _ => "",
            }
        ));
        pair_json.push(p);
    }
    results.insert("pairs".into(), Value::Array(pair_json));

    // 2. All corpus images in one store.
    let images = IMAGES;
    let all = ctx.work.join("all");
    let _ = std::fs::remove_dir_all(&all);
    let store = all.join("tessera");
    let nb = all.join("nydus");
    let mut ours_time = 0.0;
    let mut nydus_time = 0.0;
    let mut ours_rss = 0;
    let mut nydus_rss = 0;
    let mut input = 0u64;
    let mut prev_boot: Option<PathBuf> = None;
    let parents = |img: &str| -> Option<&'static str> {
        match img {
            "debian-python" | "debian-gcc" => Some("debian-base"),
            "app-pandas-a" => Some("debian-python"),
            "app-pandas-b" => Some("app-pandas-a"),
            "debian-base-rebuilt" => Some("debian-base"),
            "debian-python-rebuilt" => Some("debian-python"),
            _ => None,
        }
    };
    let mut boots: std::collections::HashMap<&str, PathBuf> = Default::default();
    for (i, img) in images.iter().enumerate() {
        eprintln!("all: {img}");
        let dict: Vec<&str> = images[..i].to_vec();
        let r = ctx.ours(&store, img, img, &dict)?;
        ours_time += r.seconds;
        ours_rss = ours_rss.max(r.max_rss_kb);
        input += uncompressed_bytes(&summary, img);
        // nydus-image takes one chunk dictionary: the image's closest relative.
        let d = parents(img)
            .and_then(|p| boots.get(p))
            .cloned()
            .or(prev_boot.clone());
        let (nr, boot) = ctx.nydus(&nb, img, img, d.as_deref())?;
        nydus_time += nr.seconds;
        nydus_rss = nydus_rss.max(nr.max_rss_kb);
        boots.insert(img, boot.clone());
        prev_boot = Some(boot);
    }
    let ours_total = dir_bytes(&store.join("blobs"));
    let nydus_total = dir_bytes(&nb);
    let mut uniq = BTreeSet::new();
    let mut oci_unique = 0u64;
    for i in summary["images"].as_array().into_iter().flatten() {
        for l in i["layers"].as_array().into_iter().flatten() {
            if uniq.insert(l["digest"].as_str().unwrap_or_default().to_string()) {
                oci_unique += l["size"].as_u64().unwrap_or(0);
            }
        }
    }
    table.push_str(&format!(
        "| all 7 corpus images, one store | {} ({:.2}× unique OCI gzip layers {}) | {} | {:.2} | ≤ 0.75× OCI; ≤ nydus |\n",
        mb(ours_total),
        ours_total as f64 / oci_unique as f64,
        mb(oci_unique),
        mb(nydus_total),
        ours_total as f64 / nydus_total.max(1) as f64
    ));
    let tput = |secs: f64| input as f64 / 1e6 / secs.max(1e-9);
    table.push_str(&format!(
        "| conversion throughput, all images (MB/s of uncompressed layers, wall) | {:.0} MB/s | {:.0} MB/s | {:.2}× faster | ≥ 2× nydus |\n",
        tput(ours_time),
        tput(nydus_time),
        tput(ours_time) / tput(nydus_time)
    ));
    table.push_str(&format!(
        "| peak RSS during corpus conversion | {} MiB | {} MiB | {:.2} | |\n",
        ours_rss / 1024,
        nydus_rss / 1024,
        ours_rss as f64 / nydus_rss.max(1) as f64
    ));
    results.insert(
        "all".into(),
        json!({"tessera_bytes": ours_total, "nydus_bytes": nydus_total, "oci_unique_compressed": oci_unique, "input_uncompressed": input,
               "tessera_seconds": ours_time, "nydus_seconds": nydus_time, "tessera_max_rss_kb": ours_rss, "nydus_max_rss_kb": nydus_rss}),
    );

    // 3. 27 bytes inserted at the start of a large file.
    {
        let dir = ctx.work.join("insert27");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let src_file = ctx.work.join("layers/app-pandas-a");
        // The largest file of the pandas layer: numpy's bundled OpenBLAS.
        let mut biggest: Option<(u64, PathBuf)> = None;
        let unpacked = dir.join("src");
        std::fs::create_dir_all(&unpacked)?;
        let layers = extract_archive(
            &ctx.corpus.join("docker-archive/app-pandas-a.tar"),
            &src_file,
        )?;
        let last = layers.last().context("layers")?;
        let st = Command::new("tar")
            .arg("-xf")
            .arg(last)
            .arg("-C")
            .arg(&unpacked)
            .status()?;
        if !st.success() {
            bail!("extracting the pandas layer");
        }
        fn walk(p: &Path, best: &mut Option<(u64, PathBuf)>) {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    let Ok(m) = e.path().symlink_metadata() else {
                        continue;
                    };
                    if m.is_dir() {
                        walk(&e.path(), best);
                    } else if m.is_file() && best.as_ref().is_none_or(|b| m.len() > b.0) {
                        *best = Some((m.len(), e.path()));
                    }
                }
            }
        }
        walk(&unpacked, &mut biggest);
        let (size, path) = biggest.context("no file")?;
        let data = std::fs::read(&path)?;
        let mut shifted = b"27 bytes inserted at start!".to_vec();
        shifted.extend_from_slice(&data);
        let mk = |name: &str, content: &[u8]| -> Result<()> {
            let d = dir.join(name);
            std::fs::create_dir_all(d.join("root"))?;
            std::fs::write(d.join("root/big.so"), content)?;
            let st = Command::new("tar")
                .arg("-cf")
                .arg(d.join("layer.tar"))
                .arg("-C")
                .arg(d.join("root"))
                .arg("big.so")
                .status()?;
            if !st.success() {
                bail!("tar");
            }
            std::fs::write(d.join("config.json"), br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#)?;
            std::fs::write(
                d.join("manifest.json"),
                br#"[{"Config":"config.json","RepoTags":["x:latest"],"Layers":["layer.tar"]}]"#,
            )?;
            std::fs::create_dir_all(ctx.corpus.join("docker-archive")).ok();
            let st = Command::new("tar")
                .arg("-cf")
                .arg(dir.join(format!("{name}.tar")))
                .arg("-C")
                .arg(&d)
                .args(["manifest.json", "config.json", "layer.tar"])
                .status()?;
            if !st.success() {
                bail!("tar");
            }
            Ok(())
        };
        mk("orig", &data)?;
        mk("shifted", &shifted)?;
        let ctx2 = Ctx {
            tessera: ctx.tessera.clone(),
            nydus: ctx.nydus.clone(),
            work: dir.clone(),
            corpus: dir.clone(),
        };
        // Ctx reads archives from corpus/docker-archive/NAME.tar.
        std::fs::create_dir_all(dir.join("docker-archive"))?;
        std::fs::rename(dir.join("orig.tar"), dir.join("docker-archive/orig.tar"))?;
        std::fs::rename(
            dir.join("shifted.tar"),
            dir.join("docker-archive/shifted.tar"),
        )?;
        let p = pair(&ctx2, "orig", "shifted")?;
        let t = p["tessera_added"].as_u64().unwrap_or(0);
        let n = p["nydus_added"].as_u64().unwrap_or(0);
        table.push_str(&format!(
            "| 27 bytes inserted at the start of a {} file ({}) | {} ({:.2}% of the file) | {} ({:.1}%) | {:.3} | ≤ 1% of the file |\n",
            mb(size),
            path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            mb(t),
            100.0 * t as f64 / size as f64,
            mb(n),
            100.0 * n as f64 / size as f64,
            t as f64 / n.max(1) as f64
        ));
        results.insert(
            "insert27".into(),
            json!({"file_bytes": size, "tessera_added": t, "nydus_added": n}),
        );
    }

    // 4. Peak RSS on a big image.
    if args.big_gb > 0.0 {
        eprintln!("big image: {} GB", args.big_gb);
        let dir = ctx.work.join("big");
        let archive = write_big_image(&dir, args.big_gb)?;
        let out = dir.join("tessera-out");
        let _ = std::fs::remove_dir_all(&out);
        let r = timed(
            Command::new(&ctx.tessera)
                .arg("--no-progress")
                .arg("convert")
                .arg("--no-cache")
                .arg(format!("docker-archive:{}", archive.display()))
                .arg(format!("oci:{}:big", out.display())),
        )?;
        let nb = dir.join("nydus-out");
        let _ = std::fs::remove_dir_all(&nb);
        std::fs::create_dir_all(&nb)?;
        let nr = timed(nydus_create(&ctx.nydus, &nb, &nb.join("boot")).arg(dir.join("layer.tar")))?;
        let bytes = (args.big_gb * 1e9) as u64;
        table.push_str(&format!(
            "| {:.0} GB image: peak RSS | {} MiB | {} MiB | {:.2} | ≤ 512 MiB |\n| {:.0} GB image: throughput | {:.0} MB/s | {:.0} MB/s | {:.2}× faster | ≥ 2× nydus |\n",
            args.big_gb,
            r.max_rss_kb / 1024,
            nr.max_rss_kb / 1024,
            r.max_rss_kb as f64 / nr.max_rss_kb.max(1) as f64,
            args.big_gb,
            bytes as f64 / 1e6 / r.seconds,
            bytes as f64 / 1e6 / nr.seconds,
            nr.seconds / r.seconds
        ));
        results.insert(
            "big".into(),
            json!({"bytes": bytes, "tessera": r, "nydus": nr}),
        );
        let _ = std::fs::remove_dir_all(&out);
        let _ = std::fs::remove_dir_all(&nb);
    }

    println!("{table}");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    results.insert("machine".into(), json!({"cores": cores}));
    results.insert("table_markdown".into(), Value::String(table));
    std::fs::write(
        &args.json,
        serde_json::to_vec_pretty(&Value::Object(results))?,
    )?;
    eprintln!("JSON written to {}", args.json.display());
    Ok(())
}
