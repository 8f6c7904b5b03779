//! End-to-end against a real registry (Debian's docker-registry, CNCF Distribution 2.8)
//! started on loopback: push converted images, convert registry → registry with a
//! chunk dictionary (packs mounted across repositories), unpack from the registry, and
//! skopeo reading what tessera wrote.

mod common;
use common::*;

#[test]
fn convert_to_and_from_docker_registry() {
    let reg = DockerRegistry::start();
    let w = tempfile::tempdir().unwrap();
    let src = w.path().join("src");
    let base = noise(3 << 20, 21);
    let mut l1 = TarBuilder::new();
    l1.dir(b"usr", 0o755)
        .file(b"usr/base.bin", 0o644, &base)
        .link(tar::EntryType::Symlink, "usr/link", "base.bin");
    let mut l2 = TarBuilder::new();
    l2.file(b"app.bin", 0o755, &noise(1 << 20, 22));
    write_image(
        &src,
        "v1",
        &[Layer {
            tar: l1.finish(),
            compression: "gzip",
        }],
        |_| {},
    );
    let mut l1b = TarBuilder::new();
    l1b.dir(b"usr", 0o755)
        .file(b"usr/base.bin", 0o644, &base)
        .link(tar::EntryType::Symlink, "usr/link", "base.bin");
    write_image(
        &src,
        "v2",
        &[
            Layer {
                tar: l1b.finish(),
                compression: "gzip",
            },
            Layer {
                tar: l2.finish(),
                compression: "gzip",
            },
        ],
        |_| {},
    );

    let a = &reg.addr;
    // OCI layout → registry.
    convert(
        &format!("oci:{}:v1", src.display()),
        &format!("{a}/tessera/base:v1"),
        &[],
    );
    // Registry → registry in another repository, deduplicated against v1: the base pack
    // is mounted, only the app layer's chunks are new.
    let plain = format!("{a}/plain/app:v2");
    require_tool("skopeo", "skopeo");
    run_ok(std::process::Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v2", src.display()),
        &format!("docker://{plain}"),
    ]));
    let v = run_json(tessera().args([
        "convert",
        "--no-cache",
        "--json",
        "--dedup-with",
        &format!("{a}/tessera/base:v1"),
        &plain,
        &format!("{a}/tessera/app:v2"),
    ]));
    let new_bytes = v["images"][0]["new_bytes"].as_u64().unwrap();
    assert!(
        new_bytes <= (1 << 20) + 4096,
        "only the app layer is new, got {new_bytes}"
    );

    // Unpack from the registry equals unpack of the same image from a layout.
    let from_reg = w.path().join("from-reg");
    run_ok(
        tessera()
            .args(["unpack", &format!("{a}/tessera/app:v2")])
            .arg(&from_reg),
    );
    convert(
        &format!("oci:{}:v2", src.display()),
        &format!("oci:{}/dst:v2", w.path().display()),
        &[],
    );
    let from_layout = w.path().join("from-layout");
    run_ok(
        tessera()
            .args(["unpack", &format!("oci:{}/dst:v2", w.path().display())])
            .arg(&from_layout),
    );
    assert_same_tree(&from_layout, &from_reg);
    assert_eq!(std::fs::read(from_reg.join("usr/base.bin")).unwrap(), base);

    // A stock client reads the tessera manifest and its subject link.
    let raw = run_ok(std::process::Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{a}/tessera/app:v2"),
    ]));
    let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(m["artifactType"], "application/vnd.tessera.image.v1");
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.tessera.index.v1"
    );
    let src_digest = run_ok(std::process::Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--format",
        "{{.Digest}}",
        &format!("docker://{plain}"),
    ]));
    assert_eq!(m["subject"]["digest"].as_str().unwrap(), src_digest.trim());

    // A wrong tag is a clear error.
    let err = run_err(tessera().args(["inspect", &format!("{a}/tessera/app:missing")]));
    assert!(err.contains("not found"), "{err}");
}
