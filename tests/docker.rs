//! Docker Engine against `tessera serve` with htpasswd auth and the bearer-token issuer:
//! an anonymous `docker pull` of a repository anonymous may pull (Docker gives up on a
//! Basic challenge, so this needs the token protocol), `docker login` + `docker push`,
//! a push that the rules deny, and a pull of a private repository without login.
//! dockerd is started by the test with its own data root, exec root and socket.

mod common;
use common::docker::Dockerd;
use common::serve::TesseraServe;
use common::*;
use std::path::Path;

/// A one-file image in dockerd, made from a tar by `docker import`.
fn import_image(dk: &Dockerd, dir: &Path, name: &str, content: &[u8]) {
    let tar = TarBuilder::new()
        .dir(b"etc", 0o755)
        .file(b"etc/greeting", 0o644, content)
        .finish();
    let p = dir.join("rootfs.tar");
    std::fs::write(&p, tar).unwrap();
    dk.ok(&["import", p.to_str().unwrap(), name]);
}

#[test]
fn docker_pulls_anonymously_logs_in_pushes_and_is_denied_what_rules_deny() {
    let dk = Dockerd::start();
    let work = tempfile::tempdir().unwrap();
    let reg = TesseraServe::start_with_users(work.path());
    let host = reg.addr.clone();
    let public = format!("{host}/public/hello:1");
    let private = format!("{host}/private/app:1");

    import_image(&dk, work.path(), &public, b"hello from tessera\n");
    dk.ok(&["tag", &public, &private]);

    // Anonymous push: denied (the token grants pull only).
    let out = dk.fails(&["push", &public]);
    assert!(
        out.contains("denied")
            || out.contains("unauthorized")
            || out.contains("authentication required"),
        "anonymous push: {out}"
    );

    // alice logs in (basic credentials exchanged for a token) and pushes both.
    let out = dk.ok(&["login", &host, "-u", "alice", "-p", "alice-pw"]);
    assert!(out.contains("Login Succeeded"), "{out}");
    dk.ok(&["push", &public]);
    dk.ok(&["push", &private]);
    dk.ok(&["logout", &host]);

    // A wrong password is refused at login.
    let out = dk.fails(&["login", &host, "-u", "alice", "-p", "wrong"]);
    assert!(out.contains("unauthorized") || out.contains("401"), "{out}");

    // bob may pull but not push.
    dk.ok(&["login", &host, "-u", "bob", "-p", "bob-pw"]);
    dk.ok(&["tag", &public, &format!("{host}/public/hello:bob")]);
    let out = dk.fails(&["push", &format!("{host}/public/hello:bob")]);
    assert!(
        out.contains("denied") || out.contains("unauthorized"),
        "bob's push: {out}"
    );
    dk.ok(&["logout", &host]);

    // Anonymous pull of the public repository, with nothing left locally.
    dk.ok(&[
        "rmi",
        "-f",
        &public,
        &private,
        &format!("{host}/public/hello:bob"),
    ]);
    dk.ok(&["pull", &public]);
    let id = dk.ok(&["image", "inspect", "--format", "{{.Id}}", &public]);
    assert!(id.trim().starts_with("sha256:"), "{id}");
    // The private one needs a login.
    let out = dk.fails(&["pull", &private]);
    assert!(
        out.contains("denied") || out.contains("unauthorized") || out.contains("not found"),
        "anonymous pull of a private repository: {out}"
    );
    dk.ok(&["login", &host, "-u", "bob", "-p", "bob-pw"]);
    dk.ok(&["pull", &private]);
}
