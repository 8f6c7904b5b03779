//! `tessera node` as containerd's remote snapshotter, against a real containerd 2.x
//! (started here with its own root, state and socket) and real registries on loopback:
//! lazy pulls of plain images through their tessera twins, exact root filesystems when
//! images share layers with twin-backed ones, the snapshots API's semantics through
//! `ctr`, and a daemon killed and started again.

mod common;

use common::node::*;
use common::serve::TesseraServe;
use common::{require_root, run_ok};
use std::time::{Duration, Instant};

#[test]
fn containerd_runs_plain_images_lazily_from_their_twins_and_exactly_when_they_share_layers() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    // Registry A makes twins of what is pushed; registry B is plain (no twins).
    let a = TesseraServe::start_args(&["--convert-on-push"]);
    let b = TesseraServe::start();
    push(&a.addr, "debian-python", "lib/python:3");
    wait_for_twin(&a.addr, "lib/python", &manifest_digest("debian-python"));
    push(&b.addr, "debian-base", "lib/base:1");
    push(&b.addr, "app-pandas-a", "app/pandas:a");

    let node = NodeDaemon::start(
        &work.path().join("node"),
        &work.path().join("tessera.sock"),
        &work.path().join("node.log"),
    );
    let ctd = Containerd::start(&work.path().join("containerd"), &node.socket);

    // A plain image with a twin: containerd downloads no layer, the root is lazy.
    let python = format!("{}/lib/python:3", a.addr);
    ctd.pull(&python);
    let content = ctd.content();
    for layer in ["sha256:8c6c9477ab1c", "sha256:a92f83cd0281"] {
        assert!(
            !content.contains(layer),
            "containerd downloaded layer {layer} of a twin-backed image:\n{content}"
        );
    }
    assert_eq!(node.metric("tessera_node_lazy_images"), 1.0);
    assert_eq!(node.metric("tessera_node_placeholder_layers_total"), 1.0);
    let out = ctd.run(
        &python,
        "py",
        &format!("python3 -c 'print(6*7)' && {CHECK}"),
    );
    assert!(out.starts_with("42\n"), "{out}");
    assert_eq!(out["42\n".len()..], expected("debian-python", work.path()));

    // A plain image without a twin whose only layer is the twin-backed image's lower
    // layer (same chain id, so containerd does not even ask): the placeholder is
    // downloaded and unpacked on first use, and the root is exactly that layer.
    let base = format!("{}/lib/base:1", b.addr);
    ctd.pull(&base);
    let out = ctd.run(&base, "base", CHECK);
    assert_eq!(out, expected("debian-base", work.path()));
    assert_eq!(node.metric("tessera_node_materialized_layers_total"), 1.0);

    // A plain image without a twin built on the twin-backed image's top layer (same
    // first two chain ids): its own layer is unpacked by containerd over the lazy tree.
    let pandas = format!("{}/app/pandas:a", b.addr);
    ctd.pull(&pandas);
    let out = ctd.run(&pandas, "pandas", CHECK);
    assert_eq!(out, expected("app-pandas-a", work.path()));
    assert_eq!(node.metric("tessera_node_lazy_images"), 1.0);

    // Removing the images lets containerd's GC remove every snapshot, lazy mounts too.
    for i in [&python, &base, &pandas] {
        run_ok(ctd.ctr().args(["image", "rm", "--sync", i]));
    }
    let start = Instant::now();
    loop {
        let left = run_ok(
            ctd.ctr()
                .args(["snapshots", "--snapshotter", "tessera", "ls"]),
        );
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&*node.root.to_string_lossy()))
            .count();
        if left.lines().count() <= 1 && mounted == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "snapshots or mounts left after the images were removed:\n{left}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(node.metric("tessera_node_lazy_images"), 0.0);
}
