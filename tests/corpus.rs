//! Every corpus image (scripts/corpus.sh; scripts/test.sh builds it into
//! $TESSERA_CORPUS): convert into one store with a growing chunk dictionary, unpack, and
//! compare with `umoci unpack` of the source. Also the zstd variant and docker-archives.

mod common;
use common::*;
use std::path::PathBuf;

fn corpus() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("TESSERA_CORPUS").unwrap_or_else(|_| "/var/cache/tessera/corpus".into()),
    );
    assert!(
        dir.join("summary.json").exists(),
        "the image corpus is missing at {}: run scripts/test.sh, or scripts/corpus.sh DIR and set TESSERA_CORPUS=DIR",
        dir.display()
    );
    dir
}

const IMAGES: &[&str] = &[
    "debian-base",
    "debian-python",
    "debian-gcc",
    "app-pandas-a",
    "app-pandas-b",
    "debian-base-rebuilt",
    "debian-python-rebuilt",
];

#[test]
fn corpus_images_unpack_identical_to_umoci() {
    require_root();
    let c = corpus();
    let w = tempfile::tempdir().unwrap();
    let store = format!("oci:{}/store", w.path().display());
    let mut converted: Vec<String> = Vec::new();
    for img in IMAGES {
        let mut cmd = tessera();
        cmd.args([
            "convert",
            "--no-cache",
            &format!("oci:{}/oci/{img}:latest", c.display()),
            &format!("{store}:{img}"),
        ]);
        for d in &converted {
            cmd.args(["--dedup-with", &format!("{store}:{d}")]);
        }
        run_ok(&mut cmd);
        converted.push(img.to_string());
        let ours = w.path().join(format!("ours-{img}"));
        run_ok(
            tessera()
                .args(["unpack", &format!("{store}:{img}")])
                .arg(&ours),
        );
        let reference = umoci_rootfs(&c.join("oci").join(img), "latest", w.path());
        assert_same_tree(&reference, &ours);
        std::fs::remove_dir_all(&ours).unwrap();
        std::fs::remove_dir_all(reference.parent().unwrap()).unwrap();
    }
}

#[test]
fn zstd_layers_and_docker_archives_give_the_same_index() {
    let c = corpus();
    let w = tempfile::tempdir().unwrap();
    let store = format!("oci:{}/store", w.path().display());
    let index_of = |tag: &str| index_digest(&format!("{store}:{tag}"));
    convert(
        &format!("oci:{}/oci/debian-python:latest", c.display()),
        &format!("{store}:gzip"),
        &[],
    );
    convert(
        &format!("oci:{}/oci/debian-python-zstd:latest", c.display()),
        &format!("{store}:zstd"),
        &[],
    );
    assert_eq!(index_of("gzip"), index_of("zstd"));
    let archive = c.join("docker-archive/debian-python.tar");
    assert!(
        archive.exists(),
        "corpus built without docker-archive exports (DOCKER_ARCHIVE=0?)"
    );
    convert(
        &format!("docker-archive:{}", archive.display()),
        &format!("{store}:archive"),
        &[],
    );
    assert_eq!(index_of("gzip"), index_of("archive"));
}
