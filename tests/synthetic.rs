//! End-to-end: images built here with every filesystem edge case, converted, unpacked,
//! and compared with `umoci unpack` of the source (the reference rootfs). Plus bad
//! input: each must fail with a clear error and leave nothing visible at DST.

mod common;
use common::*;
use std::path::Path;
use tar::EntryType;

fn edge_case_layers() -> Vec<Layer> {
    let mut l1 = TarBuilder::new();
    l1.pax(&[("mtime", b"1700000000.123456789")])
        .dir(b"./", 0o755);
    l1.dir(b"etc", 0o755)
        .file(b"etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    l1.dir(b"bin", 0o755)
        .file(b"bin/tool", 0o4755, &noise(300_000, 1));
    l1.link(EntryType::Link, "bin/tool-hardlink", "bin/tool");
    l1.dir(b"dev", 0o755)
        .special(EntryType::Char, "dev/null", 0o666, 1, 3)
        .special(EntryType::Block, "dev/sda", 0o660, 8, 0);
    l1.dir(b"run", 0o1777)
        .special(EntryType::Fifo, "run/fifo", 0o600, 0, 0);
    l1.dir(b"data", 0o2775)
        .file(b"data/empty", 0o644, b"")
        .file(b"data/zeros", 0o600, &vec![0u8; 1 << 20]);
    l1.file_owned(b"data/owned", 0o640, 1000, 1001, b"owned by 1000:1001");
    l1.dir(b"usr", 0o755).dir(b"usr/lib", 0o755);
    l1.pax(&[
        ("SCHILY.xattr.user.comment", b"hello"),
        (
            "SCHILY.xattr.security.capability",
            b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        ),
    ]);
    l1.file(b"usr/lib/ping", 0o755, b"#!/bin/sh\necho ping\n");
    l1.pax(&[("mtime", b"1600000000.5")])
        .file(b"usr/lib/ns-time", 0o644, b"nanoseconds");
    l1.link(EntryType::Symlink, "lib", "usr/lib");
    l1.link(EntryType::Symlink, "dangling", "/does/not/exist");
    l1.file(b"caf\xe9-latin1", 0o644, b"non-UTF-8 name");
    l1.dir(b"d1", 0o755)
        .file(b"d1/a", 0o644, b"a")
        .file(b"d1/b", 0o644, b"b");
    l1.dir(b"d2", 0o755).file(b"d2/old", 0o644, b"old");
    l1.file(b"file-to-dir", 0o644, b"was a file");
    l1.dir(b"dir-to-file", 0o755)
        .file(b"dir-to-file/child", 0o644, b"child");
    let mut l2 = TarBuilder::new();
    l2.file(b".wh.d1", 0o644, b"")
        .dir(b"d1", 0o700)
        .file(b"d1/c", 0o644, b"recreated");
    l2.dir(b"d2", 0o755)
        .file(b"d2/.wh..wh..opq", 0o644, b"")
        .file(b"d2/new", 0o644, b"new");
    l2.dir(b"file-to-dir", 0o750)
        .file(b"file-to-dir/inner", 0o644, b"inner");
    l2.file(b"dir-to-file", 0o600, b"now a file");
    l2.dir(b"usr/bin", 0o755)
        .link(EntryType::Link, "usr/bin/tool-hl2", "bin/tool");
    l2.file(b"etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/bash\n");
    l2.file(b"data/.wh.zeros", 0o644, b"");
    let mut big = noise(700_000, 7);
    big.extend_from_slice(&[0u8; 200_000]);
    let mut l3 = TarBuilder::new();
    l3.file(b"big", 0o644, &big);
    vec![
        Layer {
            tar: l1.finish(),
            compression: "gzip",
        },
        Layer {
            tar: l2.finish(),
            compression: "zstd",
        },
        Layer {
            tar: l3.finish(),
            compression: "none",
        },
    ]
}

#[test]
fn edge_cases_unpack_identical_to_umoci_and_convert_is_deterministic() {
    require_root();
    let w = tempfile::tempdir().unwrap();
    let src = w.path().join("src");
    write_image(&src, "edge", &edge_case_layers(), |_| {});
    // umoci reads only gzip and plain layers: the reference gets the same tars, gzipped.
    let gz: Vec<Layer> = edge_case_layers()
        .into_iter()
        .map(|l| Layer {
            tar: l.tar,
            compression: "gzip",
        })
        .collect();
    write_image(&src, "edge-gz", &gz, |_| {});
    let src_ref = format!("oci:{}:edge", src.display());

    let out1 = convert(
        &src_ref,
        &format!("oci:{}/dst1:edge", w.path().display()),
        &[],
    );
    let out2 = run_ok(tessera().args([
        "convert",
        "--no-cache",
        "--threads",
        "1",
        &src_ref,
        &format!("oci:{}/dst2:edge", w.path().display()),
    ]));
    let d1 = out1.split_whitespace().last().unwrap();
    let d2 = out2.split_whitespace().last().unwrap();
    assert_eq!(
        d1, d2,
        "conversion is deterministic across runs and thread counts"
    );

    let ours = w.path().join("rootfs");
    run_ok(
        tessera()
            .args(["unpack", &format!("oci:{}/dst1:edge", w.path().display())])
            .arg(&ours),
    );
    let reference = umoci_rootfs(&src, "edge-gz", w.path());
    assert_same_tree(&reference, &ours);
    // Layer compression does not change the index.
    convert(
        &format!("oci:{}:edge-gz", src.display()),
        &format!("oci:{}/dst3:edge", w.path().display()),
        &[],
    );
    let index_of = |d: &str| index_digest(&format!("oci:{}/{d}:edge", w.path().display()));
    assert_eq!(index_of("dst1"), index_of("dst3"));

    // Spot checks that the edge cases really are there.
    assert!(!ours.join("d1/a").exists() && ours.join("d1/c").exists());
    assert!(!ours.join("d2/old").exists() && ours.join("d2/new").exists());
    assert!(ours.join("file-to-dir/inner").exists());
    assert!(!ours.join("data/zeros").exists());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(ours.join("bin/tool")).unwrap().ino(),
        std::fs::metadata(ours.join("usr/bin/tool-hl2"))
            .unwrap()
            .ino()
    );

    // inspect --json is machine-readable and agrees.
    let v = run_json(tessera().args([
        "inspect",
        "--json",
        &format!("oci:{}/dst1:edge", w.path().display()),
    ]));
    assert_eq!(v["manifest"].as_str().unwrap(), d1);
    assert!(v["index_bytes_per_entry"].as_f64().unwrap() < 150.0);
    assert_eq!(v["subject"].as_str().unwrap().len(), 71);
}

#[test]
fn dedup_with_dictionary_and_layer_cache() {
    let w = tempfile::tempdir().unwrap();
    let src = w.path().join("src");
    let base = noise(2 << 20, 11);
    let mut a = TarBuilder::new();
    a.file(b"lib.so", 0o755, &base);
    write_image(
        &src,
        "v1",
        &[Layer {
            tar: a.finish(),
            compression: "gzip",
        }],
        |_| {},
    );
    // v2: the same file with 27 bytes inserted at its start, under another name.
    let mut shifted = b"twenty-seven bytes inserted".to_vec();
    shifted.extend_from_slice(&base);
    let mut b = TarBuilder::new();
    b.file(b"lib2.so", 0o755, &shifted);
    write_image(
        &src,
        "v2",
        &[Layer {
            tar: b.finish(),
            compression: "gzip",
        }],
        |_| {},
    );
    let dst = format!("oci:{}/dst", w.path().display());
    convert(
        &format!("oci:{}:v1", src.display()),
        &format!("{dst}:v1"),
        &[],
    );
    let v = run_json(tessera().args([
        "convert",
        "--no-cache",
        "--json",
        "--dedup-with",
        &format!("{dst}:v1"),
        &format!("oci:{}:v2", src.display()),
        &format!("{dst}:v2"),
    ]));
    let new_bytes = v["images"][0]["new_bytes"].as_u64().unwrap();
    assert!(
        new_bytes * 100 <= shifted.len() as u64 * 15,
        "a 27-byte insertion re-stored {new_bytes} of {} bytes",
        shifted.len()
    );
    // The v2 manifest references v1's pack, so v2 unpacks alone.
    let ours = w.path().join("v2-rootfs");
    run_ok(tessera().args(["unpack", &format!("{dst}:v2")]).arg(&ours));
    assert_eq!(std::fs::read(ours.join("lib2.so")).unwrap(), shifted);

    // Layer cache: the second conversion of the same layer reuses the record.
    let cache = w.path().join("cache");
    let c = cache.to_str().unwrap();
    run_ok(tessera().args([
        "convert",
        "--cache-dir",
        c,
        &format!("oci:{}:v1", src.display()),
        &format!("{dst}:v1b"),
    ]));
    let v = run_json(tessera().args([
        "convert",
        "--json",
        "--cache-dir",
        c,
        &format!("oci:{}:v1", src.display()),
        &format!("{dst}:v1c"),
    ]));
    assert_eq!(v["images"][0]["layers_from_cache"].as_u64(), Some(1));
}

/// Convert must fail with `expect` in its message and leave no image at DST.
fn assert_rejected(w: &Path, src_ref: &str, expect: &str) {
    let dst = w.join(format!(
        "dst-{}",
        expect.replace([' ', '/', '.', '\''], "_")
    ));
    let err = run_err(tessera().args([
        "convert",
        "--no-cache",
        src_ref,
        &format!("oci:{}:out", dst.display()),
    ]));
    assert!(
        err.to_lowercase().contains(&expect.to_lowercase()),
        "expected {expect:?} in: {err}"
    );
    assert!(
        !dst.join("index.json").exists(),
        "nothing may be visible at DST after a failed conversion"
    );
    assert!(
        !dst.join(".tessera-staging").exists(),
        "a failed conversion left its staging directory at DST"
    );
}

#[test]
fn bad_input_is_rejected_cleanly() {
    let w = tempfile::tempdir().unwrap();
    let src = w.path().join("src");
    let mut ok = TarBuilder::new();
    ok.file(b"a", 0o644, &noise(100_000, 3));
    let good = Layer {
        tar: ok.finish(),
        compression: "gzip",
    };

    // Digest mismatch: the blob on disk differs from its descriptor.
    let plain = Layer {
        tar: good.tar.clone(),
        compression: "none",
    };
    let md = write_image(&src, "corrupt", std::slice::from_ref(&plain), |_| {});
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("blobs/sha256").join(&md[7..])).unwrap())
            .unwrap();
    let layer_path = src
        .join("blobs/sha256")
        .join(&manifest["layers"][0]["digest"].as_str().unwrap()[7..]);
    let mut bytes = std::fs::read(&layer_path).unwrap();
    let n = bytes.len();
    bytes[n / 3] ^= 0x55;
    std::fs::write(&layer_path, &bytes).unwrap();
    assert_rejected(
        w.path(),
        &format!("oci:{}:corrupt", src.display()),
        "digest mismatch",
    );

    // Truncated layer whose descriptor matches the truncated bytes.
    let (blob, _) = good.blob();
    let cut = &blob[..blob.len() / 2];
    let d = write_blob(&src, cut);
    write_image(&src, "truncated", std::slice::from_ref(&good), |m| {
        m["layers"][0]["digest"] = d.clone().into();
        m["layers"][0]["size"] = cut.len().into();
    });
    assert_rejected(
        w.path(),
        &format!("oci:{}:truncated", src.display()),
        "bad layer",
    );

    // Unsupported media type.
    write_image(&src, "mediatype", std::slice::from_ref(&good), |m| {
        m["layers"][0]["mediaType"] = "application/x-weird".into()
    });
    assert_rejected(
        w.path(),
        &format!("oci:{}:mediatype", src.display()),
        "media type",
    );

    // Hostile paths.
    let mut t = TarBuilder::new();
    t.raw_file(b"../escape", b"x");
    write_image(
        &src,
        "dotdot",
        &[Layer {
            tar: t.finish(),
            compression: "none",
        }],
        |_| {},
    );
    assert_rejected(w.path(), &format!("oci:{}:dotdot", src.display()), "'..'");
    let mut t = TarBuilder::new();
    t.raw_file(b"/../etc/shadow", b"x");
    write_image(
        &src,
        "absolute-dotdot",
        &[Layer {
            tar: t.finish(),
            compression: "none",
        }],
        |_| {},
    );
    assert_rejected(
        w.path(),
        &format!("oci:{}:absolute-dotdot", src.display()),
        "'..'",
    );
    let mut t = TarBuilder::new();
    t.link(EntryType::Symlink, "etc", "/etc")
        .raw_file(b"/etc/cron-evil", b"x");
    write_image(
        &src,
        "symlink",
        &[Layer {
            tar: t.finish(),
            compression: "none",
        }],
        |_| {},
    );
    assert_rejected(
        w.path(),
        &format!("oci:{}:symlink", src.display()),
        "symlink",
    );

    // Malformed manifest.
    let bad = write_blob(&src, b"{\"schemaVersion\": 2, \"layers\": 5}");
    let idx_path = src.join("index.json");
    let mut idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&idx_path).unwrap()).unwrap();
    idx["manifests"].as_array_mut().unwrap().push(serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": bad, "size": 33, "annotations": {"org.opencontainers.image.ref.name": "malformed"}}));
    std::fs::write(&idx_path, serde_json::to_vec(&idx).unwrap()).unwrap();
    assert_rejected(
        w.path(),
        &format!("oci:{}:malformed", src.display()),
        "malformed manifest",
    );

    // Not found.
    assert_rejected(
        w.path(),
        &format!("oci:{}:nope", src.display()),
        "not found",
    );
}

#[test]
fn corrupt_pack_or_index_fails_unpack_and_writes_nothing() {
    let w = tempfile::tempdir().unwrap();
    let src = w.path().join("src");
    let mut t = TarBuilder::new();
    t.file(b"f", 0o644, &noise(500_000, 5));
    write_image(
        &src,
        "img",
        &[Layer {
            tar: t.finish(),
            compression: "gzip",
        }],
        |_| {},
    );
    let dst = w.path().join("dst");
    convert(
        &format!("oci:{}:img", src.display()),
        &format!("oci:{}:img", dst.display()),
        &[],
    );
    let v = run_json(tessera().args(["inspect", "--json", &format!("oci:{}:img", dst.display())]));
    let pack = v["packs"][0]["digest"].as_str().unwrap().to_string();
    let pack_path = dst.join("blobs/sha256").join(&pack[7..]);
    let orig = std::fs::read(&pack_path).unwrap();
    let mut bytes = orig.clone();
    bytes[100] ^= 0xff;
    std::fs::write(&pack_path, &bytes).unwrap();
    let out = w.path().join("rootfs");
    let err = run_err(
        tessera()
            .args(["unpack", &format!("oci:{}:img", dst.display())])
            .arg(&out),
    );
    assert!(err.contains("corrupt"), "{err}");
    assert!(!out.exists(), "a failed unpack leaves nothing at DIR");
    std::fs::write(&pack_path, &orig).unwrap();

    // A manifest whose index layer is garbage with a correct digest.
    let md = run_ok(tessera().args(["inspect", "--json", &format!("oci:{}:img", dst.display())]));
    let v: serde_json::Value = serde_json::from_str(&md).unwrap();
    let manifest_path = dst
        .join("blobs/sha256")
        .join(&v["manifest"].as_str().unwrap()[7..]);
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let garbage = b"TSRINDEX\x01\x00\x00\x00\xff\xff\xff\xff\x00\x00\x00\x00garbage";
    let gd = write_blob(&dst, garbage);
    m["layers"][0]["digest"] = gd.into();
    m["layers"][0]["size"] = garbage.len().into();
    let mb = serde_json::to_vec(&m).unwrap();
    let nd = write_blob(&dst, &mb);
    let err = run_err(
        tessera()
            .args(["unpack", &format!("oci:{}@{nd}", dst.display())])
            .arg(&out),
    );
    assert!(err.contains("index"), "{err}");
    assert!(!out.exists());
}

#[test]
fn multi_platform_index_becomes_an_index_of_tessera_manifests() {
    let w = tempfile::tempdir().unwrap();
    let src = w.path().join("src");
    let mut manifests = Vec::new();
    for (arch, content) in [
        ("amd64", b"x86 binary".as_slice()),
        ("arm64", b"arm binary".as_slice()),
    ] {
        let mut t = TarBuilder::new();
        t.file(b"bin", 0o755, content);
        let md = write_image(
            &src,
            arch,
            &[Layer {
                tar: t.finish(),
                compression: "gzip",
            }],
            |_| {},
        );
        let size = std::fs::metadata(src.join("blobs/sha256").join(&md[7..]))
            .unwrap()
            .len();
        manifests.push(serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": size, "platform": {"os": "linux", "architecture": arch}}));
    }
    // An attestation manifest (os "unknown") is skipped.
    let mut att = manifests[0].clone();
    att["platform"] = serde_json::json!({"os": "unknown", "architecture": "unknown"});
    manifests.push(att);
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests})).unwrap();
    let id = write_blob(&src, &index);
    let idx_path = src.join("index.json");
    let mut top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&idx_path).unwrap()).unwrap();
    top["manifests"].as_array_mut().unwrap().push(serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": id, "size": index.len(), "annotations": {"org.opencontainers.image.ref.name": "multi"}}));
    std::fs::write(&idx_path, serde_json::to_vec(&top).unwrap()).unwrap();

    let dst = format!("oci:{}/dst", w.path().display());
    let rep = run_json(tessera().args([
        "convert",
        "--no-cache",
        "--json",
        &format!("oci:{}:multi", src.display()),
        &format!("{dst}:multi"),
    ]));
    assert_eq!(rep["images"].as_array().unwrap().len(), 2);
    // The result is an index with artifactType and the source index as subject.
    let out_index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            w.path()
                .join("dst/blobs/sha256")
                .join(&rep["digest"].as_str().unwrap()[7..]),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        out_index["artifactType"],
        "application/vnd.tessera.image.v1"
    );
    assert_eq!(out_index["subject"]["digest"].as_str().unwrap(), id);
    assert_eq!(
        out_index["manifests"][1]["platform"]["architecture"],
        "arm64"
    );
    for (arch, content) in [
        ("amd64", b"x86 binary".as_slice()),
        ("arm64", b"arm binary".as_slice()),
    ] {
        let out = w.path().join(format!("rootfs-{arch}"));
        run_ok(
            tessera()
                .args([
                    "unpack",
                    "--platform",
                    &format!("linux/{arch}"),
                    &format!("{dst}:multi"),
                ])
                .arg(&out),
        );
        assert_eq!(std::fs::read(out.join("bin")).unwrap(), content);
    }
    // --platform on convert keeps only that platform.
    let rep = run_json(tessera().args([
        "convert",
        "--no-cache",
        "--json",
        "--platform",
        "linux/arm64",
        &format!("oci:{}:multi", src.display()),
        &format!("{dst}:arm-only"),
    ]));
    assert_eq!(rep["images"].as_array().unwrap().len(), 1);
    let err = run_err(
        tessera()
            .args([
                "unpack",
                "--platform",
                "linux/s390x",
                &format!("{dst}:multi"),
            ])
            .arg(w.path().join("nope")),
    );
    assert!(
        err.contains("linux/s390x") && err.contains("linux/amd64"),
        "{err}"
    );
}

/// A pack whose chunks are all deleted by a later layer is not published; a later
/// platform holding the same content must store it again rather than reference it.
#[test]
fn chunks_of_unpublished_packs_are_not_reused() {
    let w = tempfile::tempdir().unwrap();
    let src = w.path().join("src");
    let big = noise(400_000, 77);
    let mut l1 = TarBuilder::new();
    l1.file(b"big", 0o644, &big);
    let mut l2 = TarBuilder::new();
    l2.file(b".wh.big", 0o644, b"").file(b"small", 0o644, b"x");
    let a = write_image(
        &src,
        "amd",
        &[
            Layer {
                tar: l1.finish(),
                compression: "gzip",
            },
            Layer {
                tar: l2.finish(),
                compression: "gzip",
            },
        ],
        |_| {},
    );
    let mut l3 = TarBuilder::new();
    l3.file(b"big", 0o644, &big);
    let b = write_image(
        &src,
        "arm",
        &[Layer {
            tar: l3.finish(),
            compression: "gzip",
        }],
        |_| {},
    );
    let size = |d: &str| {
        std::fs::metadata(src.join("blobs/sha256").join(&d[7..]))
            .unwrap()
            .len()
    };
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": a, "size": size(&a), "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": b, "size": size(&b), "platform": {"os": "linux", "architecture": "arm64"}}]})).unwrap();
    let id = write_blob(&src, &index);
    let idx_path = src.join("index.json");
    let mut top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&idx_path).unwrap()).unwrap();
    top["manifests"].as_array_mut().unwrap().push(serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": id, "size": index.len(), "annotations": {"org.opencontainers.image.ref.name": "multi"}}));
    std::fs::write(&idx_path, serde_json::to_vec(&top).unwrap()).unwrap();
    let dst = w.path().join("dst");
    convert(
        &format!("oci:{}:multi", src.display()),
        &format!("oci:{}:multi", dst.display()),
        &[],
    );
    let out = w.path().join("arm-rootfs");
    run_ok(
        tessera()
            .args([
                "unpack",
                "--platform",
                "linux/arm64",
                &format!("oci:{}:multi", dst.display()),
            ])
            .arg(&out),
    );
    assert_eq!(std::fs::read(out.join("big")).unwrap(), big);
    // Untagged per-platform manifests are blobs, not index.json entries.
    let top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.join("index.json")).unwrap()).unwrap();
    assert_eq!(top["manifests"].as_array().unwrap().len(), 1);
}

#[test]
fn absolute_member_names_are_relative_to_the_root() {
    let w = tempfile::tempdir().unwrap();
    let src = w.path().join("src");
    let mut t = TarBuilder::new();
    t.raw_file(b"/etc/shadow", b"root:*:19000::::::\n")
        .raw_file(b"/opt/app", b"app");
    write_one_layer(&src, "absolute", t.finish(), "none");
    let dst = format!("oci:{}:out", w.path().join("dst").display());
    convert(&format!("oci:{}:absolute", src.display()), &dst, &[]);
    let root = w.path().join("rootfs");
    run_ok(tessera().args(["unpack", &dst]).arg(&root));
    assert_eq!(
        std::fs::read(root.join("etc/shadow")).unwrap(),
        b"root:*:19000::::::\n"
    );
    assert_eq!(std::fs::read(root.join("opt/app")).unwrap(), b"app");
    // The same tree as umoci makes of it (but the times of directories neither names).
    let opts = tessera_treediff::Options {
        ignore_root_metadata: false,
        ignore_dir_mtime: true,
    };
    let diffs =
        tessera_treediff::compare(&umoci_rootfs(&src, "absolute", w.path()), &root, &opts).unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
}

#[test]
fn convert_removes_only_the_staging_directories_it_created() {
    let w = tempfile::tempdir().unwrap();
    let src = w.path().join("src");
    let mut t = TarBuilder::new();
    t.file(b"a", 0o644, &noise(50_000, 9));
    write_one_layer(&src, "t", t.finish(), "gzip");
    // The system temp dir (here an empty one of the test's) is staged in, never removed.
    let tmp = w.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let reg = DockerRegistry::start();
    run_ok(
        tessera()
            .env("TMPDIR", &tmp)
            .args(["convert", "--no-cache"])
            .arg(format!("oci:{}:t", src.display()))
            .arg(format!("{}/staging/app:t", reg.addr)),
    );
    assert!(tmp.is_dir(), "convert removed the system temp dir");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "staging left behind"
    );
    // An OCI layout destination: its .tessera-staging goes once empty.
    let dst = w.path().join("dst");
    convert(
        &format!("oci:{}:t", src.display()),
        &format!("oci:{}:out", dst.display()),
        &[],
    );
    assert!(!dst.join(".tessera-staging").exists());
}
