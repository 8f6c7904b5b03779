//! `tessera node` as containerd's remote snapshotter, against a real containerd 2.x
//! (started here with its own root, state and socket) and real registries on loopback:
//! lazy pulls of plain images through their tessera twins, exact root filesystems when
//! images share layers with twin-backed ones, the snapshots API's semantics through
//! `ctr`, Docker Engine 28 with tessera as its snapshotter, and a daemon killed and
//! started again under a running container.

mod common;

use common::docker::{docker28_bin, Dockerd, DockerdOptions};
use common::node::*;
use common::serve::TesseraServe;
use common::{require_root, run_ok};
use std::time::{Duration, Instant};

#[test]
fn containerd_runs_plain_images_lazily_from_their_twins_and_exactly_when_they_share_layers() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    // Registry A makes twins of what is pushed; registry B is plain (no twins).
    let (_registry, python) = twin_registry();
    let b = TesseraServe::start();
    push(&b.addr, "debian-base", "lib/base:1");
    push(&b.addr, "app-pandas-a", "app/pandas:a");

    let node = NodeDaemon::start_in(work.path());
    let ctd = Containerd::start(&work.path().join("containerd"), &node.socket);

    // A plain image with a twin: containerd downloads no layer, the root is lazy.
    ctd.pull(&python);
    let content = ctd.content();
    let layers = layer_digests("debian-python");
    assert_eq!(layers.len(), 2);
    for layer in &layers {
        assert!(
            !content.contains(layer),
            "containerd downloaded layer {layer} of a twin-backed image:\n{content}"
        );
    }
    assert_eq!(node.metric("tessera_node_lazy_images"), 1.0);
    assert_eq!(node.metric("tessera_node_placeholder_layers_total"), 1.0);
    // The twin's index was downloaded once: the lazy mount read it from the node store.
    assert!(
        node.log().contains("index from the node store"),
        "the lazy mount downloaded the index again"
    );
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

#[test]
fn the_snapshots_api_keeps_containerds_semantics() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let node = NodeDaemon::start_in(work.path());
    let ctd = Containerd::start(&work.path().join("containerd"), &node.socket);
    let sn = |args: &[&str]| -> String {
        run_ok(
            ctd.ctr()
                .args(["snapshots", "--snapshotter", "tessera"])
                .args(args),
        )
    };
    let sn_err = |args: &[&str]| -> String {
        common::run_err(
            ctd.ctr()
                .args(["snapshots", "--snapshotter", "tessera"])
                .args(args),
        )
    };
    // Write into an active snapshot through the mounts containerd is told to make.
    let target = work.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let write_through = |key: &str, file: &str, data: &str| {
        let mount = sn(&["mounts", &target.display().to_string(), key]);
        run_ok(std::process::Command::new("sh").args(["-c", mount.trim()]));
        std::fs::write(target.join(file), data).unwrap();
        run_ok(std::process::Command::new("umount").arg(&target));
    };
    sn(&["prepare", "k1"]);
    write_through("k1", "a", "one");
    sn(&["commit", "c1", "k1"]);
    sn(&["prepare", "k2", "c1"]);
    write_through("k2", "b", "two");
    sn(&["commit", "c2", "k2"]);
    // A view of c2 sees both layers, read-only.
    sn(&["view", "v2", "c2"]);
    let mount = sn(&["mounts", &target.display().to_string(), "v2"]);
    run_ok(std::process::Command::new("sh").args(["-c", mount.trim()]));
    assert_eq!(std::fs::read_to_string(target.join("a")).unwrap(), "one");
    assert_eq!(std::fs::read_to_string(target.join("b")).unwrap(), "two");
    assert!(
        std::fs::write(target.join("c"), "x").is_err(),
        "a view is writable"
    );
    run_ok(std::process::Command::new("umount").arg(&target));
    // Labels are kept and returned; single labels can be changed.
    sn(&["label", "c1", "team=storage", "tier=gold"]);
    sn(&["label", "c1", "tier="]);
    let info: serde_json::Value = serde_json::from_str(&sn(&["info", "c1"])).unwrap();
    assert_eq!(info["Labels"]["team"], "storage", "{info}");
    assert!(info["Labels"].get("tier").is_none(), "{info}");
    assert_eq!(info["Kind"], "Committed", "{info}");
    // Usage counts the layer's own bytes.
    let usage = sn(&["usage", "c1"]);
    assert!(usage.contains("c1"), "{usage}");
    // Walk lists them all, with their parents.
    let ls = sn(&["ls"]);
    for (k, parent) in [("c1", ""), ("c2", "c1"), ("v2", "c2")] {
        assert!(
            ls.lines().any(|l| l.split_whitespace().next() == Some(k)
                && (parent.is_empty() || l.contains(parent))),
            "{k} missing from:\n{ls}"
        );
    }
    // A parent cannot go before its children; a key cannot be used twice.
    let e = sn_err(&["rm", "c1"]);
    assert!(e.contains("child") || e.contains("precondition"), "{e}");
    let e = sn_err(&["prepare", "k3", "no-such-parent"]);
    assert!(
        e.contains("not found") || e.contains("does not exist"),
        "{e}"
    );
    sn(&["prepare", "k3", "c2"]);
    let e = sn_err(&["prepare", "k3", "c2"]);
    assert!(e.contains("already exists"), "{e}");
    // These snapshots have no lease: containerd's garbage collection (run after each
    // removal) may take one that nothing references before the test removes it.
    for k in ["k3", "v2", "c2", "c1"] {
        let out = ctd
            .ctr()
            .args(["snapshots", "--snapshotter", "tessera", "rm", k])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("does not exist"),
            "rm {k}: {err}"
        );
    }
    assert!(sn(&["ls"]).lines().count() <= 1);
    // containerd removes backend snapshots in its garbage collection, soon after: then
    // nothing of them is left on disk. (containerd spaces its collections so that they
    // take at most 2% of the time: on a loaded machine the next one can be a minute
    // away. A collection that ran while a parent still had children can leave the
    // parent to the next one, and only a removal schedules one: seen once in CI, a
    // parent left for 120 s. So every 20 s a throwaway snapshot is made and removed.)
    let start = Instant::now();
    let mut nudged = Instant::now();
    let mut nudges = 0;
    loop {
        let left: Vec<_> = std::fs::read_dir(node.root.join("snapshots"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "snapshot directories left: {left:?} ({nudges} collections asked for)"
        );
        if nudged.elapsed() > Duration::from_secs(20) {
            // Without a lease, containerd may collect it first: errors do not matter.
            let key = format!("gc-nudge-{nudges}");
            for args in [["prepare", key.as_str()], ["rm", key.as_str()]] {
                let _ = ctd
                    .ctr()
                    .args(["snapshots", "--snapshotter", "tessera"])
                    .args(args)
                    .output();
            }
            nudges += 1;
            nudged = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_killed_node_daemon_comes_back_with_its_lazy_images_and_clears_debris() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let (_registry, python) = twin_registry();
    let root = work.path().join("node");
    let socket = work.path().join("tessera.sock");
    let log = work.path().join("node.log");
    let mut node = NodeDaemon::start(&root, &socket, &log);
    let ctd = Containerd::start(&work.path().join("containerd"), &node.socket);
    ctd.pull(&python);
    assert_eq!(ctd.run(&python, "one", "python3 -c 'print(1)'"), "1\n");
    // Killed as a crash would: its lazy mount is dead, debris of a half-made snapshot
    // is on disk.
    node.kill9();
    let debris = root.join("snapshots/999999");
    std::fs::create_dir_all(debris.join("fs/etc")).unwrap();
    let node = NodeDaemon::start(&root, &socket, &log);
    assert!(!debris.exists(), "debris of a crash survived a start");
    // containerd's connection to the plugin backs off after the crash (its gRPC client
    // fails calls fast until it reconnects): wait for it, bounded.
    let start = Instant::now();
    while !ctd
        .ctr()
        .args(["snapshots", "--snapshotter", "tessera", "ls"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "containerd did not reconnect to the restarted node daemon within 60 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // containerd (which stayed up) still finds the image unpacked, and a new container
    // runs from the lazy mount the new daemon made.
    assert_eq!(
        ctd.run(
            &python,
            "two",
            "python3 -c 'print(2)' && sha256sum /etc/os-release | cut -c1-16"
        ),
        "2\n59a77b5f2666d9c8\n"
    );
    assert_eq!(node.metric("tessera_node_lazy_mounts"), 1.0);
    drop(node);
    // `tessera node gc` does the same for a stopped daemon.
    std::fs::create_dir_all(root.join("snapshots/999998/fs")).unwrap();
    let out = common::run_json(
        common::tessera()
            .args(["node", "gc", "--json", "--root"])
            .arg(&root),
    );
    assert_eq!(out["removed"], 1, "{out}");
}

#[test]
fn a_running_container_keeps_reading_through_a_killed_and_restarted_node_daemon() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let (_registry, python) = twin_registry();
    let root = work.path().join("node");
    let socket = work.path().join("tessera.sock");
    let log = work.path().join("node.log");
    let mut node = NodeDaemon::start(&root, &socket, &log);
    let ctd = Containerd::start(&work.path().join("containerd"), &node.socket);
    ctd.pull(&python);
    // The container reads files it has not read before, one after another: each open
    // and read goes to the daemon, so the kill lands between and inside them.
    let files = "cd / && for f in $(find usr/lib/python3* -name '*.py' -size +6k | LC_ALL=C sort | head -80); do sha256sum $f; sleep $PAUSE; done";
    let want = expected_of("debian-python", work.path(), &format!("PAUSE=0; {files}"));
    assert_eq!(want.lines().count(), 80, "{want}");
    let mut ctr = ctd
        .run_cmd(&python, "reader", &format!("PAUSE=0.1; {files}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = ctr.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    let until = Instant::now() + Duration::from_secs(60);
    while got.len() < 5 {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => got.push(l),
            Err(_) => panic!("the container printed {} lines in 60 s", got.len()),
        }
    }
    node.kill9();
    // While no daemon runs, the container's reads wait (they do not fail).
    std::thread::sleep(Duration::from_secs(2));
    while let Ok(l) = rx.try_recv() {
        got.push(l);
    }
    assert!(
        got.len() < 80,
        "the container finished before the daemon was killed"
    );
    let stalled_at = got.len();
    let mut node = NodeDaemon::start(&root, &socket, &log);
    // An upgrade: SIGTERM, then a new daemon. The mount stays with the keeper again.
    while got.len() < stalled_at + 10 {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => got.push(l),
            Err(e) => panic!(
                "the container stopped printing after the restart ({e}): {:?}",
                ctr.try_wait()
            ),
        }
    }
    node.stop();
    std::thread::sleep(Duration::from_secs(1));
    let node = NodeDaemon::start(&root, &socket, &log);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = ctr.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the container did not finish within 120 s of the restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        got.push(l);
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut ctr.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "the container failed: {status}: {err}");
    assert!(err.is_empty(), "the container saw errors: {err}");
    assert_eq!(got.join("\n") + "\n", want, "wrong bytes after the restart");
    assert!(got.len() > stalled_at, "nothing was read after the restart");
    // The new daemon took the mount over rather than making another one.
    assert_eq!(node.metric("tessera_node_adopted_mounts_total"), 1.0);
    assert!(
        node.log()
            .contains("lazy mounts left to the keeper for the next daemon mounts=1"),
        "SIGTERM did not leave the mount to the keeper"
    );
    assert_eq!(node.metric("tessera_node_lazy_mounts"), 1.0);
}

#[test]
fn docker_28_runs_a_plain_image_lazily_from_its_twin_with_tessera_as_its_snapshotter() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let (_registry, python) = twin_registry();
    let node = NodeDaemon::start_in(work.path());
    let ctd = Containerd::start(&work.path().join("containerd"), &node.socket);
    // Docker's containerd image store with tessera as the snapshotter, on that
    // containerd (its proxy plugin reaches the node daemon).
    let dk = Dockerd::start_with(DockerdOptions {
        bin: Some(docker28_bin()),
        config: Some(r#"{"features": {"containerd-snapshotter": true}}"#.into()),
        containerd: Some(ctd.socket.clone()),
        path: Some(ctd.bin.display().to_string()),
        storage_driver: Some("tessera".into()),
    });
    assert_eq!(
        dk.ok(&["info", "--format", "{{.Driver}}"]).trim(),
        "tessera"
    );
    dk.ok(&["pull", "-q", &python]);
    // No layer was downloaded into containerd's store (Docker's namespace is moby).
    let content = run_ok(ctd.ctr().args(["-n", "moby", "content", "ls", "-q"]));
    for layer in layer_digests("debian-python") {
        assert!(
            !content.contains(&layer),
            "docker pull downloaded layer {layer} of a twin-backed image:\n{content}"
        );
    }
    assert_eq!(node.metric("tessera_node_lazy_images"), 1.0);
    let out = dk.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        &python,
        "sh",
        "-c",
        &format!("python3 -c 'print(6*7)' && {CHECK}"),
    ]);
    assert!(out.starts_with("42\n"), "{out}");
    assert_eq!(out["42\n".len()..], expected("debian-python", work.path()));
}

#[test]
fn a_registry_gone_mid_start_fails_the_container_cleanly_and_hangs_nothing() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let (a, python) = twin_registry();
    let node = NodeDaemon::start_in_args(work.path(), &["--fetch-timeout", "3"], &[]);
    let ctd = Containerd::start(&work.path().join("containerd"), &node.socket);
    // Pulled (lazily: nothing of the tree is on the node yet), then the registry goes.
    ctd.pull(&python);
    drop(a);
    let start = Instant::now();
    let out = ctd
        .run_cmd(&python, "gone", "python3 -c 'print(1)'")
        .output()
        .unwrap();
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The container fails (its reads end in EIO after the fetch deadline) within a
    // bound, says why, and prints nothing it should not have.
    assert!(!out.status.success(), "ran without its registry: {stdout}");
    assert!(
        took < Duration::from_secs(60),
        "the container took {took:?} to fail"
    );
    assert!(!stdout.contains('1'), "{stdout}");
    // (containerd itself reads the image's /etc/passwd and /etc/group to resolve the
    // user before the process starts: that read is the first to fail.)
    let said = format!("{stdout}{err}").to_lowercase();
    assert!(
        said.contains("input/output error"),
        "no I/O error from the container: {said}"
    );
    let log = node.log();
    assert!(
        log.contains("reads of them fail with EIO"),
        "no log line for the failed fetches:\n{log}"
    );
    // The daemon still answers containerd at once.
    let start = Instant::now();
    run_ok(
        ctd.ctr()
            .args(["snapshots", "--snapshotter", "tessera", "ls"]),
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_file_held_open_across_a_daemon_restart_opens_again() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let (_registry, python) = twin_registry();
    let root = work.path().join("node");
    let socket = work.path().join("tessera.sock");
    let log = work.path().join("node.log");
    let mut node = NodeDaemon::start(&root, &socket, &log);
    let ctd = Containerd::start(&work.path().join("containerd"), &node.socket);
    ctd.pull(&python);
    // The interpreter (several MB) is read once, so it is sealed; a long-running
    // python then holds it open with passthrough (the kernel keeps that inode's backing
    // file). After the restart a new python opens the same inode again: the new daemon
    // must answer with the same backing file, or the kernel fails the open.
    let script = "p=$(readlink -f /usr/bin/python3); cat $p > /dev/null; sleep 3; \
        python3 -c 'import time; time.sleep(15)' & sleep 1; echo READY; sleep 6; \
        python3 -c 'print(6*7)'; wait";
    let mut ctr = ctd
        .run_cmd(&python, "held", script)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(ctr.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, "READY\n");
    node.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let node = NodeDaemon::start(&root, &socket, &log);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = ctr.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut ctr.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        status.success() && rest == "42\n",
        "{status}: {rest:?} {err}"
    );
    assert!(
        node.log()
            .contains("open files of the previous daemon taken over"),
        "{}",
        node.log()
    );
}

/// containerd's ctr pull, retried while the daemon is not reachable yet (containerd's
/// client backs off after a crash).
fn pull_until_ok(ctd: &Containerd, image: &str) {
    let start = Instant::now();
    loop {
        let out = ctd.pull_cmd(image).output().unwrap();
        if out.status.success() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "ctr pull kept failing after the restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_daemon_killed_inside_prepare_or_commit_agrees_with_containerd_after_a_restart() {
    require_root();
    let b = TesseraServe::start();
    push(&b.addr, "debian-base", "lib/base:1");
    let want = {
        let w = tempfile::tempdir().unwrap();
        expected("debian-base", w.path())
    };
    for point in ["prepare", "commit"] {
        let work = tempfile::tempdir().unwrap();
        let root = work.path().join("node");
        let socket = work.path().join("tessera.sock");
        let log = work.path().join("node.log");
        let mut node = NodeDaemon::start_args(
            &root,
            &socket,
            &log,
            &[],
            &[("TESSERA_NODE_CRASH_AT", point)],
        );
        let ctd = Containerd::start(&work.path().join("containerd"), &node.socket);
        let base = format!("{}/lib/base:1", b.addr);
        // The pull's unpack reaches the crash point: the daemon dies mid-call.
        let out = ctd.pull_cmd(&base).output().unwrap();
        assert!(
            !out.status.success(),
            "{point}: the pull survived the crash"
        );
        let start = Instant::now();
        while node.child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{point}: no crash"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        node.kill9();
        let node = NodeDaemon::start(&root, &socket, &log);
        pull_until_ok(&ctd, &base);
        assert_eq!(
            ctd.run(&base, &format!("after-{point}"), CHECK),
            want,
            "{point}: wrong tree after the restart"
        );
        if point == "prepare" {
            assert!(
                node.log()
                    .contains("removed snapshot directories no record names"),
                "{point}: the half-made directory was not removed at start"
            );
        }
        // Whatever the crash left that containerd does not know (after a crash inside
        // Commit: our committed record, whose commit containerd never saw) goes with
        // containerd's garbage collection: once the image is removed, nothing is left.
        run_ok(ctd.ctr().args(["image", "rm", "--sync", &base]));
        let start = Instant::now();
        loop {
            let left: Vec<_> = std::fs::read_dir(root.join("snapshots"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{point}: snapshot directories left after containerd's GC: {left:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(node);
        let out = common::run_json(
            common::tessera()
                .args(["node", "gc", "--json", "--root"])
                .arg(&root),
        );
        assert_eq!(out["removed"], 0, "{point}: {out}");
    }
}

#[test]
fn a_twin_that_does_not_open_leaves_the_image_to_a_normal_unpack_with_a_log_line() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    // docker-registry has no referrers API: the twin is found under the fallback tag.
    let reg = common::DockerRegistry::start();
    push(&reg.addr, "debian-python", "lib/python:3");
    let plain_digest = manifest_digest("debian-python");
    // A "twin" whose index is garbage (a registry without tessera's checks takes it).
    let store_ref =
        tessera_oci::ImageRef::parse(&format!("{}/lib/python", reg.addr), false).unwrap();
    let (store, _) = tessera_oci::open(&store_ref, &Default::default()).unwrap();
    let plain = store.manifest(&plain_digest).unwrap();
    let plain_json: serde_json::Value = serde_json::from_slice(&plain.bytes).unwrap();
    let garbage = b"this is not a tessera index".to_vec();
    let gd = tessera_format::Digest::of(&garbage);
    store.put_blob_bytes(&gd, &garbage).unwrap();
    let twin = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.tessera.image.v1",
        "config": plain_json["config"],
        "layers": [{"mediaType": "application/vnd.tessera.index.v1", "digest": gd.to_string(), "size": garbage.len()}],
        "subject": {"mediaType": plain.media_type, "digest": plain_digest, "size": plain.bytes.len()},
    });
    let subject: tessera_oci::manifest::Descriptor =
        serde_json::from_value(twin["subject"].clone()).unwrap();
    store
        .put_referrer(
            &serde_json::to_vec(&twin).unwrap(),
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.tessera.image.v1",
            &subject,
        )
        .unwrap();
    let node = NodeDaemon::start_in(work.path());
    let ctd = Containerd::start(&work.path().join("containerd"), &node.socket);
    let python = format!("{}/lib/python:3", reg.addr);
    ctd.pull(&python);
    // containerd unpacked the layers itself, and the container's root is exact.
    let content = ctd.content();
    for layer in layer_digests("debian-python") {
        assert!(
            content.contains(&layer),
            "{layer} not downloaded:\n{content}"
        );
    }
    let out = ctd.run(&python, "py", CHECK);
    assert_eq!(out, expected("debian-python", work.path()));
    assert_eq!(node.metric("tessera_node_lazy_images"), 0.0);
    assert_eq!(node.metric("tessera_node_twin_fallbacks_total"), 1.0);
    let log = node.log();
    assert!(
        log.contains("is unusable") && log.contains("containerd unpacks it"),
        "no log line about the broken twin:\n{log}"
    );
}

/// The chain ids of layers given by their uncompressed tars (OCI image spec).
fn chain_ids(tars: &[&[u8]]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in tars {
        let d = common::sha(t);
        let next = match out.last() {
            None => d,
            Some(prev) => common::sha(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[test]
fn a_repeated_layer_is_told_apart_by_its_chain_id() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    // x = [base, empty, app-l, empty] has a twin; y = [base, empty, app-m] has none and
    // shares x's first two chain ids. The empty layer is the same blob at both places
    // in x: only the chain id says which one containerd unpacks.
    let base = common::TarBuilder::new()
        .dir(b"etc", 0o755)
        .file(b"etc/base", 0o644, b"base\n")
        .finish();
    let empty = common::TarBuilder::new().finish();
    let l = common::TarBuilder::new()
        .dir(b"app", 0o755)
        .file(b"app/l", 0o644, b"only in x\n")
        .finish();
    let m = common::TarBuilder::new()
        .dir(b"app", 0o755)
        .file(b"app/m", 0o644, b"only in y\n")
        .finish();
    let layout = work.path().join("layout");
    let layer = |t: &Vec<u8>| common::Layer {
        tar: t.clone(),
        compression: "gzip",
    };
    common::write_image(
        &layout,
        "x",
        &[layer(&base), layer(&empty), layer(&l), layer(&empty)],
        |_| {},
    );
    common::write_image(
        &layout,
        "y",
        &[layer(&base), layer(&empty), layer(&m)],
        |_| {},
    );
    let a = TesseraServe::start_args(&["--convert-on-push"]);
    let b = TesseraServe::start();
    let copy = |tag: &str, dest: &str| {
        run_ok(std::process::Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://{dest}"),
        ]))
    };
    copy("x", &format!("{}/rep/x:1", a.addr));
    let x_digest = {
        let idx: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        idx["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == "x")
            .unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    wait_for_twin(&a.addr, "rep/x", &x_digest);
    copy("y", &format!("{}/rep/y:1", b.addr));

    let node = NodeDaemon::start_in(work.path());
    let ctd = Containerd::start(&work.path().join("containerd"), &node.socket);
    ctd.pull(&format!("{}/rep/x:1", a.addr));
    assert_eq!(node.metric("tessera_node_lazy_images"), 1.0);
    ctd.pull(&format!("{}/rep/y:1", b.addr));
    // Look at each image's top snapshot through a view.
    let target = work.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    // (`view --target` prints the mount command in the same call: a view holds no lease
    // after ctr exits, and containerd's GC, which the pulls set off, may take it.)
    let files = |key: &str, chain: &str| -> Vec<String> {
        let mount = run_ok(ctd.ctr().args([
            "snapshots",
            "--snapshotter",
            "tessera",
            "view",
            "--target",
            &target.display().to_string(),
            key,
            chain,
        ]));
        run_ok(std::process::Command::new("sh").args(["-c", mount.trim()]));
        let mut found = Vec::new();
        for f in ["etc/base", "app/l", "app/m"] {
            if target.join(f).exists() {
                found.push(f.to_string());
            }
        }
        run_ok(std::process::Command::new("umount").arg(&target));
        found
    };
    let x_chain = chain_ids(&[&base, &empty, &l, &empty]);
    let y_chain = chain_ids(&[&base, &empty, &m]);
    assert_eq!(x_chain[..2], y_chain[..2]);
    assert_eq!(files("xv", &x_chain[3]), ["etc/base", "app/l"]);
    assert_eq!(files("yv", &y_chain[2]), ["etc/base", "app/m"]);
}
