//! Conformance of `tessera serve` with the OCI Distribution v1.1 behaviours listed in
//! the project's checklist (section C, items 1–58; `cNN_` in a test name is the item).
//! Every test starts its own server on a fresh storage root and speaks plain HTTP to
//! it (reqwest, redirects not followed; a raw socket where reqwest cannot send the
//! malformed request).
//!
//! Not covered: C.39 (`?tag=` on PUT, dev-only), C.47 (referrers-tag backfill when the
//! API is switched on: this registry always had it), C.59/C.60 (proxying).

mod common;
use common::serve::*;
use common::{noise, sha};
use serde_json::{json, Value};
use std::time::Duration;

// ---- data builders --------------------------------------------------------------------

fn j(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

fn desc(media_type: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha(bytes), "size": bytes.len()})
}

fn empty_config() -> Value {
    json!({"mediaType": OCI_EMPTY, "digest": EMPTY_JSON_DIGEST, "size": 2})
}

/// Push a config and one gzip-typed layer to `repo`; returns the (unpushed) OCI image
/// manifest referencing them.
fn image_manifest(s: &TesseraServe, repo: &str, seed: u64) -> Value {
    let config = j(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha(&seed.to_le_bytes())]},
        "config": {"Labels": {"seed": seed.to_string()}},
    }));
    let layer = noise(3000, seed + 1);
    s.push_blob(repo, &config);
    s.push_blob(repo, &layer);
    json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(OCI_CONFIG, &config),
        "layers": [desc(OCI_LAYER_GZIP, &layer)],
    })
}

/// Push an image (blobs and manifest) tagged `tag`; returns manifest bytes and digest.
fn push_image(s: &TesseraServe, repo: &str, tag: &str, seed: u64) -> (Vec<u8>, String) {
    let m = j(&image_manifest(s, repo, seed));
    let d = s.push_manifest(repo, tag, OCI_MANIFEST, &m);
    (m, d)
}

/// An artifact manifest (empty config, one small layer pushed to `repo`), optionally
/// referring to `subject`.
fn artifact(
    s: &TesseraServe,
    repo: &str,
    artifact_type: &str,
    subject: Option<Value>,
    annotations: Option<Value>,
) -> Vec<u8> {
    s.push_blob(repo, b"{}");
    let layer = format!("payload of {artifact_type} {subject:?} {annotations:?}").into_bytes();
    s.push_blob(repo, &layer);
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": empty_config(),
        "layers": [desc("application/octet-stream", &layer)],
    });
    if let Some(sub) = subject {
        m["subject"] = sub;
    }
    if let Some(a) = annotations {
        m["annotations"] = a;
    }
    j(&m)
}

fn json_body(r: reqwest::blocking::Response) -> Value {
    let text = r.text().unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn bytes(r: reqwest::blocking::Response) -> Vec<u8> {
    r.bytes().unwrap().to_vec()
}

/// Push by tag, then GET by tag and by digest: identical bytes, Content-Type and
/// Docker-Content-Digest.
fn round_trip(s: &TesseraServe, repo: &str, tag: &str, media_type: &str, m: &[u8]) {
    let d = sha(m);
    let r = expect_status(
        s.put_manifest(repo, tag, media_type, m),
        201,
        &format!("PUT {media_type} {repo}:{tag}"),
    );
    assert_eq!(header(&r, "docker-content-digest").as_deref(), Some(&*d));
    for reference in [tag, &d] {
        let r = expect_status(
            s.get_manifest(repo, reference),
            200,
            &format!("GET {repo}:{reference}"),
        );
        assert_eq!(
            header(&r, "content-type").as_deref(),
            Some(media_type),
            "{repo}:{reference}"
        );
        assert_eq!(
            header(&r, "docker-content-digest").as_deref(),
            Some(&*d),
            "{repo}:{reference}"
        );
        assert_eq!(
            bytes(r),
            m,
            "{repo}:{reference}: bytes differ from the pushed ones"
        );
    }
}

fn tags_of(v: &Value) -> Vec<String> {
    v["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("no tags array: {v}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

// ---- C.1 base -------------------------------------------------------------------------

#[test]
fn c01_base_endpoint() {
    let s = TesseraServe::start();
    let r = expect_status(s.get("/v2/"), 200, "GET /v2/");
    assert_eq!(
        header(&r, "docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
    let r = expect_status(s.head("/v2/"), 200, "HEAD /v2/");
    assert_eq!(
        header(&r, "docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
}

/// htpasswd entries (bcrypt, `htpasswd -B`): alice:s3cret, bob:hunter2.
const HTPASSWD: &str = "alice:$2y$05$abcdefghijklmnopqrstuuLK7U1u6pVRmL7L1BBM2aS35PSZnDXlK\nbob:$2y$05$0123456789abcdefghijkezUgIbSggCpWorCPjVZj7Y5z/jqErOkG\n";

fn write_htpasswd() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("htpasswd");
    std::fs::write(&p, HTPASSWD).unwrap();
    (dir, p)
}

#[track_caller]
fn assert_challenge(r: reqwest::blocking::Response, what: &str) {
    // A bearer challenge sends the client to the token endpoint (Docker gives up on a
    // Basic one when it has no credentials); Basic credentials are still accepted.
    let auth = header(&r, "www-authenticate").unwrap_or_default();
    assert!(
        auth.starts_with("Bearer ")
            && auth.contains("/token\"")
            && auth.contains("service=\"tessera\""),
        "{what}: WWW-Authenticate {auth:?}"
    );
    assert_error(r, 401, &["UNAUTHORIZED"]);
}

/// C.1 with credentials required: 401 + Basic challenge, then 200 with them.
#[test]
fn c01_basic_auth_with_htpasswd() {
    let (_d, htpasswd) = write_htpasswd();
    let s = TesseraServe::start_args(&["--htpasswd", htpasswd.to_str().unwrap()]);
    let get = |user: Option<(&str, &str)>| {
        let mut rq = s.client.get(s.url("/v2/"));
        if let Some((u, p)) = user {
            rq = rq.basic_auth(u, Some(p));
        }
        rq.send().unwrap()
    };
    assert_challenge(get(None), "no credentials");
    assert_challenge(get(Some(("alice", "wrong"))), "wrong password");
    assert_challenge(get(Some(("mallory", "s3cret"))), "unknown user");
    let r = expect_status(get(Some(("alice", "s3cret"))), 200, "alice");
    assert_eq!(
        header(&r, "docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
    // Other endpoints are protected too.
    assert_challenge(s.get("/v2/r/tags/list"), "tags/list");
    let r = s
        .client
        .post(s.url("/v2/r/blobs/uploads/"))
        .body(Vec::new())
        .send()
        .unwrap();
    assert_challenge(r, "POST upload");
    let r = s
        .client
        .post(s.url("/v2/r/blobs/uploads/"))
        .basic_auth("bob", Some("hunter2"))
        .body(Vec::new())
        .send()
        .unwrap();
    expect_status(r, 202, "bob POST upload");
}

/// C.1 / error codes: `[[access]]` rules give 401 UNAUTHORIZED to anonymous callers
/// and 403 DENIED to authenticated ones lacking the right.
#[test]
fn c01_access_rules_unauthorized_and_denied() {
    let (d, htpasswd) = write_htpasswd();
    let cfg = d.path().join("registry.toml");
    std::fs::write(
        &cfg,
        format!(
            "htpasswd = {:?}\n\n[[access]]\naccount = \"anonymous\"\nrepository = \"public/*\"\nactions = [\"pull\"]\n\n[[access]]\naccount = \"alice\"\nrepository = \"*\"\nactions = [\"pull\", \"push\", \"delete\"]\n\n[[access]]\naccount = \"bob\"\nrepository = \"public/*\"\nactions = [\"pull\"]\n",
            htpasswd.to_str().unwrap()
        ),
    )
    .unwrap();
    let s = TesseraServe::start_args(&["--config", cfg.to_str().unwrap()]);
    let as_user = |rq: reqwest::blocking::RequestBuilder, who: &str| match who {
        "alice" => rq.basic_auth("alice", Some("s3cret")),
        "bob" => rq.basic_auth("bob", Some("hunter2")),
        _ => rq,
    };
    // alice pushes to public/app and private/app.
    let data = b"layer".to_vec();
    let d = sha(&data);
    for repo in ["public/app", "private/app"] {
        let r = as_user(
            s.client.post(with_query(
                &s.url(&format!("/v2/{repo}/blobs/uploads/")),
                "digest",
                &d,
            )),
            "alice",
        )
        .body(data.clone())
        .send()
        .unwrap();
        expect_status(r, 201, &format!("alice push {repo}"));
    }
    let get = |repo: &str, who: &str| {
        as_user(s.client.get(s.url(&format!("/v2/{repo}/blobs/{d}"))), who)
            .send()
            .unwrap()
    };
    expect_status(get("public/app", "anonymous"), 200, "anonymous pull public");
    expect_status(get("public/app", "bob"), 200, "bob pull public");
    assert_challenge(get("private/app", "anonymous"), "anonymous pull private");
    assert_error(get("private/app", "bob"), 403, &["DENIED"]);
    expect_status(get("private/app", "alice"), 200, "alice pull private");
    // Push rights.
    let post = |repo: &str, who: &str| {
        as_user(
            s.client.post(s.url(&format!("/v2/{repo}/blobs/uploads/"))),
            who,
        )
        .body(Vec::new())
        .send()
        .unwrap()
    };
    assert_challenge(post("public/app", "anonymous"), "anonymous push");
    assert_error(post("public/app", "bob"), 403, &["DENIED"]);
    // Delete rights.
    let del = |who: &str| {
        as_user(
            s.client.delete(s.url(&format!("/v2/public/app/blobs/{d}"))),
            who,
        )
        .send()
        .unwrap()
    };
    assert_error(del("bob"), 403, &["DENIED"]);
    expect_status(del("alice"), 202, "alice delete");
}

/// The Docker token protocol: `/token` issues anonymous tokens for what anonymous may
/// do and user tokens for basic credentials; a token grants only the rules' share of
/// what it asked for; a token that lacks a scope gets a 401 naming it; forged and
/// wrong-password requests are refused.
#[test]
fn c01_bearer_tokens_from_the_token_endpoint() {
    let (d, htpasswd) = write_htpasswd();
    let cfg = d.path().join("registry.toml");
    std::fs::write(
        &cfg,
        format!(
            "htpasswd = {:?}\ntoken_ttl_secs = 60\n\n[[access]]\naccount = \"anonymous\"\nrepository = \"public/*\"\nactions = [\"pull\"]\n\n[[access]]\naccount = \"alice\"\nrepository = \"*\"\nactions = [\"pull\", \"push\"]\n",
            htpasswd.to_str().unwrap()
        ),
    )
    .unwrap();
    let s = TesseraServe::start_args(&["--config", cfg.to_str().unwrap()]);
    let token = |scope: &str, user: Option<(&str, &str)>| {
        let mut rq = s
            .client
            .get(s.url("/token"))
            .query(&[("service", "tessera"), ("scope", scope)]);
        if let Some((u, p)) = user {
            rq = rq.basic_auth(u, Some(p));
        }
        rq.send().unwrap()
    };
    let bearer = |r: reqwest::blocking::Response| -> String {
        let r = expect_status(r, 200, "token");
        let v: serde_json::Value = r.json().unwrap();
        assert_eq!(v["expires_in"], 60, "{v}");
        assert_eq!(v["token"], v["access_token"], "{v}");
        assert!(v["issued_at"].as_str().unwrap().ends_with('Z'), "{v}");
        v["token"].as_str().unwrap().to_string()
    };
    // alice pushes a blob to public/app with a token she got for her password.
    let data = b"layer".to_vec();
    let dg = sha(&data);
    let alice = bearer(token(
        "repository:public/app:pull,push",
        Some(("alice", "s3cret")),
    ));
    let r = s
        .client
        .post(with_query(
            &s.url("/v2/public/app/blobs/uploads/"),
            "digest",
            &dg,
        ))
        .bearer_auth(&alice)
        .body(data.clone())
        .send()
        .unwrap();
    expect_status(r, 201, "alice pushes with a token");
    // The ping takes any valid token; an anonymous one pulls public/app.
    let anon = bearer(token("repository:public/app:pull,push", None));
    let r = s
        .client
        .get(s.url("/v2/"))
        .bearer_auth(&anon)
        .send()
        .unwrap();
    expect_status(r, 200, "ping with an anonymous token");
    let get = |repo: &str, tok: &str| {
        s.client
            .get(s.url(&format!("/v2/{repo}/blobs/{dg}")))
            .bearer_auth(tok)
            .send()
            .unwrap()
    };
    expect_status(
        get("public/app", &anon),
        200,
        "anonymous token pulls public",
    );
    // ...but it was not granted push, and is told which scope it lacks.
    let r = s
        .client
        .post(s.url("/v2/public/app/blobs/uploads/"))
        .bearer_auth(&anon)
        .body(Vec::new())
        .send()
        .unwrap();
    let chal = header(&r, "www-authenticate").unwrap_or_default();
    assert!(
        chal.contains("scope=\"repository:public/app:pull,push\"")
            && chal.contains("insufficient_scope"),
        "{chal}"
    );
    assert_error(r, 401, &["DENIED"]);
    // A token for one repository is no use for another.
    let r = get("public/other", &anon);
    assert_eq!(r.status(), 401);
    // Wrong password: no token. Forged or altered tokens: refused.
    let r = token("repository:public/app:pull", Some(("alice", "wrong")));
    assert_error(r, 401, &["UNAUTHORIZED"]);
    let mut forged = alice.clone();
    forged.insert(
        5,
        if forged.as_bytes()[5] == b'A' {
            'B'
        } else {
            'A'
        },
    );
    assert_challenge(get("public/app", &forged), "altered token");
    assert_challenge(get("public/app", "not-a-token"), "junk token");
    // OAuth2 password grant (POST /token), as some clients log in.
    let r = s
        .client
        .post(s.url("/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", "s3cret"),
            ("service", "tessera"),
            ("scope", "repository:private/x:pull"),
        ])
        .send()
        .unwrap();
    let tok = bearer(r);
    let r = s
        .client
        .get(s.url("/v2/private/x/tags/list"))
        .bearer_auth(&tok)
        .send()
        .unwrap();
    assert_ne!(r.status(), 401, "alice's token reaches private/x");
    assert_ne!(r.status(), 403);
    // Invalid scopes are refused outright.
    let r = token("repository:UPPER:pull", None);
    assert_eq!(r.status(), 400);
    // Without auth there is no token endpoint.
    let open = TesseraServe::start();
    assert_error(open.get("/token"), 404, &["UNSUPPORTED"]);
}

// ---- C.2 names ------------------------------------------------------------------------

#[test]
fn c02_invalid_repository_names() {
    let s = TesseraServe::start();
    let blob = sha(b"x");
    for name in ["Upper", "lib/Upper", "-lead", "a//b", "a___b", "a-", "a/.b"] {
        let what = format!("name {name:?}");
        let r = s.get_manifest(name, "latest");
        assert_error(r, 400, &["NAME_INVALID"]);
        assert_error(
            s.get(&format!("/v2/{name}/tags/list")),
            400,
            &["NAME_INVALID"],
        );
        assert_error(
            s.get(&format!("/v2/{name}/blobs/{blob}")),
            400,
            &["NAME_INVALID"],
        );
        let r = s
            .client
            .post(s.url(&format!("/v2/{name}/blobs/uploads/")))
            .body(Vec::new())
            .send()
            .unwrap();
        assert_error(r, 400, &["NAME_INVALID"]);
        let r = s.put_manifest(name, "latest", OCI_MANIFEST, b"{}");
        assert_error(r, 400, &["NAME_INVALID"]);
        assert!(
            s.head_manifest(name, "latest").status() == 400,
            "HEAD manifest of {what}"
        );
    }
}

#[test]
fn c02_multi_segment_names_route() {
    let s = TesseraServe::start();
    for repo in [
        "x/blobs/manifests/y",
        "r/tags/list/referrers/uploads",
        "a/b/c",
    ] {
        let m = image_manifest(&s, repo, 3);
        let layer = m["layers"][0]["digest"].as_str().unwrap().to_string();
        let m = j(&m);
        let d = s.push_manifest(repo, "t1", OCI_MANIFEST, &m);
        assert_eq!(
            bytes(expect_status(s.get_manifest(repo, "t1"), 200, repo)),
            m
        );
        assert_eq!(bytes(expect_status(s.get_manifest(repo, &d), 200, repo)), m);
        expect_status(s.get(&format!("/v2/{repo}/blobs/{layer}")), 200, repo);
        let v = json_body(expect_status(
            s.get(&format!("/v2/{repo}/tags/list")),
            200,
            repo,
        ));
        assert_eq!(v, json!({"name": repo, "tags": ["t1"]}));
        let v = json_body(expect_status(
            s.get(&format!("/v2/{repo}/referrers/{d}")),
            200,
            repo,
        ));
        assert_eq!(v["manifests"], json!([]), "{repo}");
    }
}

// ---- C.3 tags -------------------------------------------------------------------------

#[test]
fn c03_tag_grammar() {
    let s = TesseraServe::start();
    let m = j(&image_manifest(&s, "r", 1));
    let longest = format!("A{}", "b".repeat(127));
    for tag in [longest.as_str(), "_x", "Ab.C-d_1", "0"] {
        s.push_manifest("r", tag, OCI_MANIFEST, &m);
        expect_status(s.get_manifest("r", tag), 200, tag);
    }
    let too_long = "c".repeat(129);
    for tag in [too_long.as_str(), ".x", "-x", "a+b"] {
        let r = s.put_manifest("r", tag, OCI_MANIFEST, &m);
        assert_error(r, 400, &["TAG_INVALID", "MANIFEST_INVALID"]);
    }
    let v = json_body(s.get("/v2/r/tags/list"));
    let mut want = vec!["0".to_string(), longest, "Ab.C-d_1".into(), "_x".into()];
    want.sort();
    assert_eq!(tags_of(&v), want);
}

// ---- C.4 digests ----------------------------------------------------------------------

#[test]
fn c04_garbled_digests() {
    let s = TesseraServe::start();
    push_image(&s, "r", "v1", 1);
    let short = format!("sha256:{}", "a".repeat(63));
    for bad in [
        "sha256:totallywrong",
        "sha256:baddigeststring",
        short.as_str(),
    ] {
        assert_error(
            s.get(&format!("/v2/r/blobs/{bad}")),
            400,
            &["DIGEST_INVALID"],
        );
        assert_eq!(s.head(&format!("/v2/r/blobs/{bad}")).status(), 400, "{bad}");
        assert_error(
            s.delete(&format!("/v2/r/blobs/{bad}")),
            400,
            &["DIGEST_INVALID"],
        );
        // A manifest reference that is neither a tag nor a digest names no manifest.
        assert_error(s.get_manifest("r", bad), 404, &["MANIFEST_UNKNOWN"]);
        assert_eq!(s.head_manifest("r", bad).status(), 404, "{bad}");
        assert_error(
            s.delete(&format!("/v2/r/manifests/{bad}")),
            404,
            &["MANIFEST_UNKNOWN"],
        );
        // Closing an upload with a garbled digest.
        let loc = s.start_upload("r");
        assert_error(s.put_close(&loc, bad, b"data"), 400, &["DIGEST_INVALID"]);
    }
    // Unknown algorithm.
    let md5 = "md5:d41d8cd98f00b204e9800998ecf8427e";
    assert_error(s.get_manifest("r", md5), 404, &["MANIFEST_UNKNOWN"]);
    let r = s.get(&format!("/v2/r/blobs/{md5}"));
    let st = r.status().as_u16();
    let v = assert_error_in(r, &[400, 405], &["DIGEST_INVALID", "UNSUPPORTED"]);
    let code = v["errors"][0]["code"].as_str().unwrap();
    assert!(
        (st == 400 && code == "DIGEST_INVALID") || code == "UNSUPPORTED",
        "{st} {code}"
    );
    let loc = s.start_upload("r");
    let r = s.put_close(&loc, md5, b"");
    assert_error_in(r, &[400, 405], &["DIGEST_INVALID", "UNSUPPORTED"]);
}

// ---- C.5 sha512 -----------------------------------------------------------------------

#[test]
fn c05_sha512_blobs_and_manifests() {
    let s = TesseraServe::start();
    let data = noise(5000, 512);
    let d512 = sha512(&data);
    let loc = s.start_upload("r");
    let r = expect_status(s.put_close(&loc, &d512, &data), 201, "PUT sha512 blob");
    assert_eq!(header(&r, "docker-content-digest").as_deref(), Some(&*d512));
    assert_eq!(
        header(&r, "location").map(|l| path_of(&l)).as_deref(),
        Some(&*format!("/v2/r/blobs/{d512}"))
    );
    let r = expect_status(s.get(&format!("/v2/r/blobs/{d512}")), 200, "GET sha512");
    assert_eq!(header(&r, "docker-content-digest").as_deref(), Some(&*d512));
    assert_eq!(bytes(r), data);

    // Monolithic POST ?digest=sha512.
    let config = br#"{"architecture":"arm64","os":"linux"}"#.to_vec();
    let c512 = sha512(&config);
    let r = s
        .client
        .post(with_query(&s.url("/v2/r/blobs/uploads/"), "digest", &c512))
        .header("Content-Type", "application/octet-stream")
        .body(config.clone())
        .send()
        .unwrap();
    expect_status(r, 201, "POST ?digest=sha512");

    // Wrong sha512 digest.
    let loc = s.start_upload("r");
    assert_error(
        s.put_close(&loc, &sha512(b"other"), &data),
        400,
        &["DIGEST_INVALID"],
    );

    // A manifest made of sha512 blobs, pushed by its sha512 digest.
    let m = j(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": c512, "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER_TAR, "digest": d512, "size": data.len()}],
    }));
    let m512 = sha512(&m);
    let r = expect_status(
        s.put_manifest("r", &m512, OCI_MANIFEST, &m),
        201,
        "PUT manifest by sha512",
    );
    assert_eq!(header(&r, "docker-content-digest").as_deref(), Some(&*m512));
    let r = expect_status(s.get_manifest("r", &m512), 200, "GET manifest by sha512");
    assert_eq!(header(&r, "docker-content-digest").as_deref(), Some(&*m512));
    assert_eq!(bytes(r), m);
    // Mismatching sha512 in the URL.
    let r = s.put_manifest("r", &sha512(b"nope"), OCI_MANIFEST, &m);
    assert_error(r, 400, &["DIGEST_INVALID"]);
}

// ---- C.6 unknown repository ----------------------------------------------------------

#[test]
fn c06_unknown_repository_and_unknown_content() {
    let s = TesseraServe::start();
    let d = sha(b"nothing here");
    assert_error(
        s.get_manifest("nope", "latest"),
        404,
        &["NAME_UNKNOWN", "MANIFEST_UNKNOWN"],
    );
    assert_eq!(s.head_manifest("nope", "latest").status(), 404);
    assert_error(
        s.get_manifest("nope", &d),
        404,
        &["NAME_UNKNOWN", "MANIFEST_UNKNOWN"],
    );
    assert_error(
        s.get(&format!("/v2/nope/blobs/{d}")),
        404,
        &["NAME_UNKNOWN", "BLOB_UNKNOWN"],
    );
    assert_eq!(s.head(&format!("/v2/nope/blobs/{d}")).status(), 404);
    assert_error(s.get("/v2/nope/tags/list"), 404, &["NAME_UNKNOWN"]);
    assert_error(
        s.delete("/v2/nope/manifests/latest"),
        404,
        &["NAME_UNKNOWN", "MANIFEST_UNKNOWN"],
    );
    assert_error(
        s.delete(&format!("/v2/nope/manifests/{d}")),
        404,
        &["NAME_UNKNOWN", "MANIFEST_UNKNOWN"],
    );
    // Known repository, unknown content.
    push_image(&s, "r", "v1", 1);
    assert_error(s.get_manifest("r", "v2"), 404, &["MANIFEST_UNKNOWN"]);
    assert_error(s.get_manifest("r", &d), 404, &["MANIFEST_UNKNOWN"]);
    assert_eq!(s.head_manifest("r", "v2").status(), 404);
    assert_error(s.get(&format!("/v2/r/blobs/{d}")), 404, &["BLOB_UNKNOWN"]);
    assert_error(s.delete("/v2/r/manifests/v2"), 404, &["MANIFEST_UNKNOWN"]);
}

// ---- C.7–C.9 pull manifests ----------------------------------------------------------

#[test]
fn c07_manifest_get_head_by_tag_and_digest() {
    let s = TesseraServe::start();
    let (m, d) = push_image(&s, "lib/app", "v1", 7);
    for reference in ["v1", d.as_str()] {
        let g = expect_status(s.get_manifest("lib/app", reference), 200, reference);
        let h = expect_status(s.head_manifest("lib/app", reference), 200, reference);
        for name in ["content-length", "content-type", "docker-content-digest"] {
            assert!(header(&g, name).is_some(), "GET {reference}: no {name}");
            assert_eq!(header(&g, name), header(&h, name), "{reference}: {name}");
        }
        assert_eq!(header(&g, "content-length"), Some(m.len().to_string()));
        assert_eq!(header(&h, "docker-content-digest").as_deref(), Some(&*d));
        assert!(bytes(h).is_empty(), "HEAD has a body");
        assert_eq!(bytes(g), m);
    }
}

#[test]
fn c08_manifest_bytes_identical_and_content_type() {
    let s = TesseraServe::start();
    let v = image_manifest(&s, "r", 8);
    // Pretty-printed with a trailing newline: not the canonical serialisation.
    let mut m = serde_json::to_vec_pretty(&v).unwrap();
    m.extend_from_slice(b"\n");
    let d = sha(&m);
    let r = expect_status(s.put_manifest("r", "pretty", OCI_MANIFEST, &m), 201, "PUT");
    assert_eq!(header(&r, "docker-content-digest").as_deref(), Some(&*d));
    for reference in ["pretty", d.as_str()] {
        let r = expect_status(s.get_manifest("r", reference), 200, reference);
        assert_eq!(header(&r, "content-type").as_deref(), Some(OCI_MANIFEST));
        assert_eq!(header(&r, "docker-content-digest").as_deref(), Some(&*d));
        let body = bytes(r);
        assert_eq!(sha(&body), d);
        assert_eq!(body, m);
    }
}

#[test]
fn c09_accept_and_content_type_parameters() {
    let s = TesseraServe::start();
    let m = j(&image_manifest(&s, "r", 9));
    // Parameters on the PUT Content-Type are ignored, and not echoed on GET.
    s.push_manifest("r", "v1", &format!("{OCI_MANIFEST}; charset=utf-8"), &m);
    for accept in [
        OCI_MANIFEST,
        "*/*",
        "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json;q=0.9",
    ] {
        let r = s
            .client
            .get(s.url("/v2/r/manifests/v1"))
            .header("Accept", accept)
            .send()
            .unwrap();
        let r = expect_status(r, 200, accept);
        assert_eq!(header(&r, "content-type").as_deref(), Some(OCI_MANIFEST));
        assert_eq!(bytes(r), m);
    }
}

// ---- C.10–C.13 pull blobs -------------------------------------------------------------

#[test]
fn c10_c13_blob_get_head() {
    let s = TesseraServe::start();
    let data = noise(70_000, 10);
    let d = s.push_blob("r", &data);
    let path = format!("/v2/r/blobs/{d}");
    // Served directly (C.13: no redirect even though redirects are not followed).
    let g = expect_status(s.get(&path), 200, "GET blob");
    let h = expect_status(s.head(&path), 200, "HEAD blob");
    for r in [&g, &h] {
        assert_eq!(header(r, "content-length"), Some(data.len().to_string()));
        assert_eq!(header(r, "docker-content-digest").as_deref(), Some(&*d));
        assert_eq!(
            header(r, "content-type").as_deref(),
            Some("application/octet-stream")
        );
        assert_eq!(header(r, "accept-ranges").as_deref(), Some("bytes"));
    }
    assert!(bytes(h).is_empty());
    let body = bytes(g);
    assert_eq!(sha(&body), d);
    assert_eq!(body, data);
}

#[test]
fn c11_blob_range_requests() {
    let s = TesseraServe::start();
    let data = noise(2048, 11);
    let d = s.push_blob("r", &data);
    let url = s.url(&format!("/v2/r/blobs/{d}"));
    let get = |range: &str| s.client.get(&url).header("Range", range).send().unwrap();
    for (range, a, b) in [
        ("bytes=500-1499", 500usize, 1499usize),
        ("bytes=500-", 500, 2047),
        ("bytes=-500", 1548, 2047),
        ("bytes=2000-5000", 2000, 2047),
        ("bytes=0-0", 0, 0),
        ("bytes=2047-2047", 2047, 2047),
    ] {
        let r = expect_status(get(range), 206, range);
        assert_eq!(
            header(&r, "content-range"),
            Some(format!("bytes {a}-{b}/2048")),
            "{range}"
        );
        assert_eq!(
            header(&r, "content-length"),
            Some((b - a + 1).to_string()),
            "{range}"
        );
        assert_eq!(bytes(r), &data[a..=b], "{range}");
    }
    for range in ["bytes=500-0", "bytes=5000-10000", "bytes=2048-"] {
        let r = get(range);
        assert_eq!(r.status(), 416, "{range}: {}", body_text(get(range)));
        assert_eq!(
            header(&r, "content-range").as_deref(),
            Some("bytes */2048"),
            "{range}"
        );
    }
}

#[test]
fn c12_zero_byte_and_empty_json_blobs() {
    let s = TesseraServe::start();
    for (data, d) in [(&b""[..], ZERO_DIGEST), (&b"{}"[..], EMPTY_JSON_DIGEST)] {
        assert_eq!(sha(data), d);
        s.push_blob("r", data);
        let path = format!("/v2/r/blobs/{d}");
        let h = expect_status(s.head(&path), 200, d);
        assert_eq!(header(&h, "content-length"), Some(data.len().to_string()));
        assert_eq!(header(&h, "docker-content-digest").as_deref(), Some(d));
        let g = expect_status(s.get(&path), 200, d);
        assert_eq!(header(&g, "content-length"), Some(data.len().to_string()));
        assert_eq!(bytes(g), data);
        expect_status(s.delete(&path), 202, d);
        assert_error(s.get(&path), 404, &["BLOB_UNKNOWN"]);
        assert_eq!(s.head(&path).status(), 404);
    }
    // Single-request POST of the zero-byte blob.
    let r = s
        .client
        .post(with_query(
            &s.url("/v2/r/blobs/uploads/"),
            "digest",
            ZERO_DIGEST,
        ))
        .header("Content-Type", "application/octet-stream")
        .body(Vec::new())
        .send()
        .unwrap();
    expect_status(r, 201, "POST ?digest=<zero-byte>");
    expect_status(s.head(&format!("/v2/r/blobs/{ZERO_DIGEST}")), 200, "HEAD");
}

// ---- C.14–C.28 push blobs -------------------------------------------------------------

#[test]
fn c14_post_opens_upload_session() {
    let s = TesseraServe::start();
    let r = s
        .client
        .post(s.url("/v2/lib/app/blobs/uploads/"))
        .body(Vec::new())
        .send()
        .unwrap();
    let r = expect_status(r, 202, "POST /blobs/uploads/");
    let loc = header(&r, "location").expect("Location");
    assert!(
        loc.starts_with("/v2/lib/app/blobs/uploads/")
            && loc.len() > "/v2/lib/app/blobs/uploads/".len(),
        "Location must be relative /v2/lib/app/blobs/uploads/<id>: {loc}"
    );
    assert_eq!(header(&r, "range").as_deref(), Some("0-0"));
    let uuid = header(&r, "docker-upload-uuid").expect("Docker-Upload-UUID");
    assert!(
        !uuid.is_empty() && loc.contains(&uuid),
        "{uuid} not in {loc}"
    );
    assert_eq!(header(&r, "oci-chunk-min-length"), None);
    // Two sessions are distinct.
    let loc2 = s.start_upload("lib/app");
    assert_ne!(loc, loc2);
    // The fresh session reports an empty upload.
    let r = expect_status(s.get(&loc), 204, "GET fresh session");
    assert_eq!(header(&r, "range").as_deref(), Some("0-0"));
}

#[test]
fn c15_monolithic_post_put() {
    let s = TesseraServe::start();
    let data = noise(100_000, 15);
    let d = sha(&data);
    let loc = s.start_upload("r");
    let r = expect_status(s.put_close(&loc, &d, &data), 201, "PUT ?digest");
    assert_eq!(header(&r, "docker-content-digest").as_deref(), Some(&*d));
    let blob_loc = header(&r, "location").expect("Location");
    assert_eq!(path_of(&blob_loc), format!("/v2/r/blobs/{d}"));
    assert_eq!(
        bytes(expect_status(s.get(&blob_loc), 200, "GET Location")),
        data
    );
    // The session is gone once closed.
    assert_error(s.get(&loc), 404, &["BLOB_UPLOAD_UNKNOWN"]);
}

#[test]
fn c16_single_post_with_digest() {
    let s = TesseraServe::start();
    let data = noise(30_000, 16);
    let d = sha(&data);
    let r = s
        .client
        .post(with_query(&s.url("/v2/r/blobs/uploads/"), "digest", &d))
        .header("Content-Type", "application/octet-stream")
        .body(data.clone())
        .send()
        .unwrap();
    let r = expect_status(r, 201, "POST ?digest=");
    assert_eq!(header(&r, "docker-content-digest").as_deref(), Some(&*d));
    let loc = header(&r, "location").expect("Location");
    assert_eq!(path_of(&loc), format!("/v2/r/blobs/{d}"));
    assert_eq!(bytes(expect_status(s.get(&loc), 200, "GET")), data);
}

#[test]
fn c17_streamed_patch_without_content_range() {
    let s = TesseraServe::start();
    let data = noise(50_000, 17);
    let d = sha(&data);
    let loc = s.start_upload("r");
    let r = expect_status(s.patch(&loc, &data[..20_000], None), 202, "PATCH 1");
    assert_eq!(header(&r, "range").as_deref(), Some("0-19999"));
    let loc = header(&r, "location").expect("PATCH Location");
    // Second chunk with chunked transfer encoding (no Content-Length).
    let r = s
        .client
        .patch(s.url(&loc))
        .header("Content-Type", "application/octet-stream")
        .body(reqwest::blocking::Body::new(std::io::Cursor::new(
            data[20_000..].to_vec(),
        )))
        .send()
        .unwrap();
    let r = expect_status(r, 202, "PATCH 2 (chunked encoding)");
    assert_eq!(header(&r, "range").as_deref(), Some("0-49999"));
    let loc = header(&r, "location").expect("PATCH Location");
    let r = expect_status(s.put_close(&loc, &d, b""), 201, "PUT close");
    assert_eq!(header(&r, "docker-content-digest").as_deref(), Some(&*d));
    assert_eq!(bytes(s.get(&format!("/v2/r/blobs/{d}"))), data);
}

#[test]
fn c18_chunked_patch_with_content_range() {
    let s = TesseraServe::start();
    let data = noise(3000, 18);
    let d = sha(&data);
    let mut loc = s.start_upload("r");
    for (a, b) in [(0usize, 1000usize), (1000, 2000), (2000, 3000)] {
        let r = expect_status(
            s.patch(&loc, &data[a..b], Some(a as u64)),
            202,
            &format!("PATCH {a}-{}", b - 1),
        );
        assert_eq!(header(&r, "range"), Some(format!("0-{}", b - 1)));
        loc = header(&r, "location").expect("PATCH Location");
        assert!(
            path_of(&loc).starts_with("/v2/r/blobs/uploads/"),
            "PATCH Location {loc}"
        );
    }
    expect_status(s.put_close(&loc, &d, b""), 201, "PUT close");
    assert_eq!(bytes(s.get(&format!("/v2/r/blobs/{d}"))), data);
}

#[test]
fn c19_c20_out_of_order_chunk_then_status_and_resume() {
    let s = TesseraServe::start();
    let data = noise(2000, 19);
    let d = sha(&data);
    let loc = s.start_upload("r");
    // A first chunk that does not start at 0.
    assert_error(
        s.patch(&loc, &data[..100], Some(1)),
        416,
        &["BLOB_UPLOAD_INVALID"],
    );
    let r = expect_status(s.patch(&loc, &data[..1000], Some(0)), 202, "PATCH 0-999");
    let loc = header(&r, "location").unwrap();
    // Skipping ahead, re-sending the first chunk, overlapping.
    for start in [2000usize, 0, 500, 1001] {
        let end = (start + 1000).min(2000);
        let chunk = if start < 2000 {
            data[start..end].to_vec()
        } else {
            noise(1000, 1)
        };
        assert_error(
            s.patch(&loc, &chunk, Some(start as u64)),
            416,
            &["BLOB_UPLOAD_INVALID"],
        );
    }
    // C.20: the session is intact.
    let r = expect_status(s.get(&loc), 204, "GET upload status after 416");
    assert_eq!(header(&r, "range").as_deref(), Some("0-999"));
    let status_loc = header(&r, "location").expect("GET status: Location");
    assert!(path_of(&status_loc).starts_with("/v2/r/blobs/uploads/"));
    assert!(bytes(r).is_empty());
    let r = expect_status(
        s.patch(&status_loc, &data[1000..], Some(1000)),
        202,
        "PATCH 1000-1999",
    );
    assert_eq!(header(&r, "range").as_deref(), Some("0-1999"));
    let loc = header(&r, "location").unwrap();
    expect_status(s.put_close(&loc, &d, b""), 201, "PUT close");
    assert_eq!(bytes(s.get(&format!("/v2/r/blobs/{d}"))), data);
}

#[test]
fn c21_final_chunk_in_closing_put() {
    let s = TesseraServe::start();
    let data = noise(1500, 21);
    let d = sha(&data);
    let loc = s.start_upload("r");
    let r = expect_status(s.patch(&loc, &data[..1000], Some(0)), 202, "PATCH");
    let loc = header(&r, "location").unwrap();
    let r = s
        .client
        .put(with_query(&s.url(&loc), "digest", &d))
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", "1000-1499")
        .body(data[1000..].to_vec())
        .send()
        .unwrap();
    let r = expect_status(r, 201, "PUT with final chunk");
    assert_eq!(header(&r, "docker-content-digest").as_deref(), Some(&*d));
    assert_eq!(bytes(s.get(&format!("/v2/r/blobs/{d}"))), data);
}

#[test]
fn c22_content_length_mismatch_and_malformed_range() {
    let s = TesseraServe::start();
    let loc = path_of(&s.start_upload("r"));
    let body = noise(50, 22);
    let mut req = format!(
        "PATCH {loc} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Range: 0-99\r\nContent-Length: 50\r\nConnection: close\r\n\r\n",
        s.addr
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let (status, text) = raw_request(&s.addr, &req);
    assert_eq!(status, 400, "Content-Range 0-99 with 50 bytes: {text}");
    assert!(text.contains("SIZE_INVALID"), "{text}");

    for bad in ["abc", "99-0", "0-", "-5-94"] {
        let loc = s.start_upload("r");
        let r = s
            .client
            .patch(s.url(&loc))
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", bad)
            .body(noise(100, 1))
            .send()
            .unwrap();
        assert_error_in(r, &[400, 416], OCI_ERROR_CODES);
    }
}

#[test]
fn c23_wrong_digest_never_publishes_the_blob() {
    let s = TesseraServe::start();
    let url = |loc: &str| s.url(loc);
    for variant in 0..5u64 {
        let data = noise(2000, 230 + variant);
        let real = sha(&data);
        let wrong = sha(format!("not the data {variant}").as_bytes());
        let r = match variant {
            // POST ?digest= with the body.
            0 => s
                .client
                .post(with_query(&url("/v2/r/blobs/uploads/"), "digest", &wrong))
                .header("Content-Type", "application/octet-stream")
                .body(data.clone())
                .send()
                .unwrap(),
            // POST then PUT with the body.
            1 => s.put_close(&s.start_upload("r"), &wrong, &data),
            // Chunked PATCH then empty PUT.
            2 => {
                let loc = s.start_upload("r");
                let r = expect_status(s.patch(&loc, &data, Some(0)), 202, "PATCH");
                s.put_close(&header(&r, "location").unwrap(), &wrong, b"")
            }
            // Chunked PATCH then PUT with the last chunk.
            3 => {
                let loc = s.start_upload("r");
                let r = expect_status(s.patch(&loc, &data[..1000], Some(0)), 202, "PATCH");
                let loc = header(&r, "location").unwrap();
                s.client
                    .put(with_query(&url(&loc), "digest", &wrong))
                    .header("Content-Type", "application/octet-stream")
                    .header("Content-Range", "1000-1999")
                    .body(data[1000..].to_vec())
                    .send()
                    .unwrap()
            }
            // Streamed PATCH then empty PUT.
            _ => {
                let loc = s.start_upload("r");
                let r = expect_status(s.patch(&loc, &data, None), 202, "PATCH");
                s.put_close(&header(&r, "location").unwrap(), &wrong, b"")
            }
        };
        assert_error(r, 400, &["DIGEST_INVALID"]);
        for d in [&wrong, &real] {
            let p = format!("/v2/r/blobs/{d}");
            assert_eq!(s.head(&p).status(), 404, "variant {variant}: {d} visible");
            assert_eq!(s.get(&p).status(), 404, "variant {variant}: {d} visible");
        }
    }
}

#[test]
fn c24_three_chunks_of_min_length() {
    let s = TesseraServe::start();
    let loc = s.start_upload("r");
    let r = s.get(&loc);
    let min: usize = header(&r, "oci-chunk-min-length")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0)
        .max(1024);
    let data = noise(3 * min, 24);
    let d = sha(&data);
    let mut loc = loc;
    for i in 0..3 {
        let r = expect_status(
            s.patch(&loc, &data[i * min..(i + 1) * min], Some((i * min) as u64)),
            202,
            &format!("chunk {i}"),
        );
        assert_eq!(
            header(&r, "range"),
            Some(format!("0-{}", (i + 1) * min - 1))
        );
        loc = header(&r, "location").unwrap();
    }
    expect_status(s.put_close(&loc, &d, b""), 201, "PUT");
    assert_eq!(bytes(s.get(&format!("/v2/r/blobs/{d}"))), data);
}

#[test]
fn c25_unknown_session_and_session_of_another_repository() {
    let s = TesseraServe::start();
    s.push_blob("a", b"a");
    s.push_blob("b", b"b");
    let d = sha(b"x");
    for id in ["00000000-0000-4000-8000-000000000000", "nosuchsession"] {
        let loc = format!("/v2/a/blobs/uploads/{id}");
        assert_error(s.patch(&loc, b"x", Some(0)), 404, &["BLOB_UPLOAD_UNKNOWN"]);
        assert_error(s.patch(&loc, b"x", None), 404, &["BLOB_UPLOAD_UNKNOWN"]);
        assert_error(s.put_close(&loc, &d, b"x"), 404, &["BLOB_UPLOAD_UNKNOWN"]);
        assert_error(s.get(&loc), 404, &["BLOB_UPLOAD_UNKNOWN"]);
        assert_error(s.delete(&loc), 404, &["BLOB_UPLOAD_UNKNOWN"]);
    }
    // Traversal-looking ids are just unknown.
    for id in ["..%2F..%2Fblobs", "..%2f"] {
        let st = s.get(&format!("/v2/a/blobs/uploads/{id}")).status();
        assert!(st == 404 || st == 400, "upload id {id}: {st}");
    }

    // A session of `a` used under `b`.
    let data = noise(200, 25);
    let loc_a = path_of(&s.start_upload("a"));
    let r = expect_status(s.patch(&loc_a, &data[..100], Some(0)), 202, "PATCH in a");
    let loc_a = path_of(&header(&r, "location").unwrap());
    let loc_b = loc_a.replacen("/v2/a/", "/v2/b/", 1);
    assert!(loc_b.starts_with("/v2/b/blobs/uploads/"), "{loc_b}");
    assert_error(s.get(&loc_b), 404, &["BLOB_UPLOAD_UNKNOWN"]);
    assert_error(
        s.patch(&loc_b, &data[100..], Some(100)),
        404,
        &["BLOB_UPLOAD_UNKNOWN"],
    );
    assert_error(
        s.put_close(&loc_b, &sha(&data), &data[100..]),
        404,
        &["BLOB_UPLOAD_UNKNOWN"],
    );
    assert_error(s.delete(&loc_b), 404, &["BLOB_UPLOAD_UNKNOWN"]);
    assert_eq!(s.head(&format!("/v2/b/blobs/{}", sha(&data))).status(), 404);
    // Still alive in `a`, untouched.
    let r = expect_status(s.get(&loc_a), 204, "GET in a");
    assert_eq!(header(&r, "range").as_deref(), Some("0-99"));
    expect_status(
        s.put_close(&loc_a, &sha(&data), &data[100..]),
        201,
        "PUT in a",
    );
    assert_eq!(s.head(&format!("/v2/b/blobs/{}", sha(&data))).status(), 404);
}

#[test]
fn c26_cancel_upload() {
    let s = TesseraServe::start();
    let loc = s.start_upload("r");
    let r = expect_status(s.patch(&loc, b"some bytes", Some(0)), 202, "PATCH");
    let loc = header(&r, "location").unwrap();
    expect_status(s.delete(&loc), 204, "DELETE upload");
    assert_error(s.get(&loc), 404, &["BLOB_UPLOAD_UNKNOWN"]);
    assert_error(
        s.patch(&loc, b"more", Some(10)),
        404,
        &["BLOB_UPLOAD_UNKNOWN"],
    );
    assert_error(
        s.put_close(&loc, &sha(b"some bytes"), b""),
        404,
        &["BLOB_UPLOAD_UNKNOWN"],
    );
    assert_error(s.delete(&loc), 404, &["BLOB_UPLOAD_UNKNOWN"]);
    assert_eq!(
        s.head(&format!("/v2/r/blobs/{}", sha(b"some bytes")))
            .status(),
        404
    );
}

#[test]
fn c27_concurrent_uploads_of_the_same_blob() {
    let s = TesseraServe::start();
    let data = noise(300_000, 27);
    let d = sha(&data);
    let barrier = std::sync::Barrier::new(2);
    let statuses: Vec<u16> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                sc.spawn(|| {
                    let loc = s.start_upload("r");
                    let r = expect_status(s.patch(&loc, &data[..150_000], Some(0)), 202, "PATCH");
                    let loc = header(&r, "location").unwrap();
                    barrier.wait();
                    s.put_close(&loc, &d, &data[150_000..]).status().as_u16()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses, vec![201, 201]);
    let r = expect_status(s.get(&format!("/v2/r/blobs/{d}")), 200, "GET");
    assert_eq!(bytes(r), data);
    // Stored at most once: no two inodes under the root hold these bytes (no
    // second copy, no leftover upload file).
    let copies = files_with_content(&s.root, &data);
    assert!(
        copies.len() <= 1,
        "copies of the blob in the root: {copies:?}"
    );
}

/// Distinct inodes under `dir` whose content is exactly `data`, with one path each.
fn files_with_content(dir: &std::path::Path, data: &[u8]) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file()
                && md.len() == data.len() as u64
                && std::fs::read(&p).map(|b| b == data).unwrap_or(false)
            {
                seen.entry((md.dev(), md.ino())).or_insert(p);
            }
        }
    }
    seen.into_values().collect()
}

/// C.28 and crash safety: acknowledged writes survive SIGKILL; a half-done upload
/// either resumes consistently or is gone, never a 500.
#[test]
fn c28_kill9_restart_keeps_acknowledged_data() {
    let mut s1 = TesseraServe::start();
    let (m, md) = push_image(&s1, "crash/app", "v1", 28);
    let blob = noise(10_000, 280);
    let bd = s1.push_blob("crash/app", &blob);
    let partial = noise(3000, 281);
    let loc = s1.start_upload("crash/app");
    let r = expect_status(s1.patch(&loc, &partial[..1000], Some(0)), 202, "PATCH");
    let loc = path_of(&header(&r, "location").unwrap());
    s1.kill9();

    let s2 = TesseraServe::start_in(&s1.root, &[]);
    assert_eq!(
        bytes(expect_status(
            s2.get(&format!("/v2/crash/app/blobs/{bd}")),
            200,
            "blob"
        )),
        blob
    );
    for reference in ["v1", md.as_str()] {
        let r = expect_status(s2.get_manifest("crash/app", reference), 200, reference);
        assert_eq!(bytes(r), m);
    }
    let v = json_body(expect_status(
        s2.get("/v2/crash/app/tags/list"),
        200,
        "tags",
    ));
    assert_eq!(tags_of(&v), vec!["v1"]);

    let r = s2.get(&loc);
    match r.status().as_u16() {
        204 => {
            eprintln!("upload session after kill -9: resumed");
            let range = header(&r, "range").expect("GET upload: Range");
            let end: usize = range
                .strip_prefix("0-")
                .and_then(|e| e.parse().ok())
                .unwrap_or_else(|| panic!("Range {range:?}"));
            let next = if range == "0-0" { 0 } else { end + 1 };
            assert!(
                next <= 1000,
                "resumed session claims {next} bytes, 1000 sent"
            );
            let loc = header(&r, "location").map(|l| path_of(&l)).unwrap_or(loc);
            let r = expect_status(
                s2.patch(&loc, &partial[next..], Some(next as u64)),
                202,
                "PATCH after restart",
            );
            let loc = header(&r, "location").unwrap();
            expect_status(
                s2.put_close(&loc, &sha(&partial), b""),
                201,
                "PUT after restart",
            );
            assert_eq!(
                bytes(s2.get(&format!("/v2/crash/app/blobs/{}", sha(&partial)))),
                partial
            );
        }
        404 => {
            eprintln!("upload session after kill -9: gone");
            assert_error(r, 404, &["BLOB_UPLOAD_UNKNOWN"]);
        }
        _ => panic!("upload session after kill -9: {}", body_text(r)),
    }
    // Still fully usable.
    push_image(&s2, "crash/app", "v2", 29);
}

// ---- C.29–C.32 mount ------------------------------------------------------------------

fn mount(
    s: &TesseraServe,
    repo: &str,
    digest: &str,
    from: Option<&str>,
) -> reqwest::blocking::Response {
    let mut url = with_query(
        &s.url(&format!("/v2/{repo}/blobs/uploads/")),
        "mount",
        digest,
    );
    if let Some(f) = from {
        url = with_query(&url, "from", f);
    }
    s.client.post(url).body(Vec::new()).send().unwrap()
}

#[test]
fn c29_mount_from_another_repository() {
    let s = TesseraServe::start();
    let data = noise(40_000, 29);
    let d = s.push_blob("src/repo", &data);
    for _ in 0..2 {
        // The second time the blob is already there: still 201.
        let r = expect_status(mount(&s, "dst", &d, Some("src/repo")), 201, "mount");
        assert_eq!(
            header(&r, "location").map(|l| path_of(&l)),
            Some(format!("/v2/dst/blobs/{d}"))
        );
        assert_eq!(header(&r, "docker-content-digest").as_deref(), Some(&*d));
    }
    let r = expect_status(s.get(&format!("/v2/dst/blobs/{d}")), 200, "GET mounted");
    assert_eq!(bytes(r), data);
    // The mounted blob is usable in a manifest of the target repository.
    let m = j(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": desc(OCI_CONFIG, &data), "layers": [],
    }));
    s.push_manifest("dst", "v1", OCI_MANIFEST, &m);
}

#[test]
fn c30_mount_of_missing_blob_opens_a_session() {
    let s = TesseraServe::start();
    s.push_blob("src", b"something");
    let data = noise(1000, 30);
    let d = sha(&data);
    let r = expect_status(mount(&s, "dst", &d, Some("src")), 202, "mount missing");
    let loc = header(&r, "location").expect("Location");
    assert!(
        path_of(&loc).starts_with("/v2/dst/blobs/uploads/"),
        "Location {loc}"
    );
    expect_status(s.put_close(&loc, &d, &data), 201, "PUT via mount session");
    assert_eq!(bytes(s.get(&format!("/v2/dst/blobs/{d}"))), data);
}

#[test]
fn c31_no_cross_repository_leak() {
    let s = TesseraServe::start();
    let secret = noise(5000, 31);
    let d = s.push_blob("private", &secret);
    s.push_blob("other", b"other");
    s.push_blob("b", b"b");
    // Not readable from another repository.
    assert_error(s.get(&format!("/v2/b/blobs/{d}")), 404, &["BLOB_UNKNOWN"]);
    assert_eq!(s.head(&format!("/v2/b/blobs/{d}")).status(), 404);
    // Anonymous mount (no `from`), mount from a repository that lacks it, from an
    // unknown repository: all open a session, none links the blob.
    for from in [None, Some("other"), Some("nosuchrepo")] {
        let r = expect_status(
            mount(&s, "b", &d, from),
            202,
            &format!("mount from {from:?}"),
        );
        let loc = header(&r, "location").expect("Location");
        assert!(path_of(&loc).starts_with("/v2/b/blobs/uploads/"), "{loc}");
        assert_eq!(
            s.head(&format!("/v2/b/blobs/{d}")).status(),
            404,
            "mount from {from:?} leaked the blob"
        );
    }
    // A manifest in `b` cannot reference it either.
    let m = j(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": desc(OCI_CONFIG, &secret), "layers": [],
    }));
    assert_error(
        s.put_manifest("b", "v1", OCI_MANIFEST, &m),
        400,
        &["MANIFEST_BLOB_UNKNOWN"],
    );
    // Pushing it to `b` makes it readable there.
    s.push_blob("b", &secret);
    expect_status(s.get(&format!("/v2/b/blobs/{d}")), 200, "after push");
}

#[test]
fn c32_mount_with_garbage_digest_opens_a_session() {
    let s = TesseraServe::start();
    s.push_blob("src", b"data");
    for garbage in ["sha256:totallywrong", "notadigest", "sha256:"] {
        let r = expect_status(mount(&s, "dst", garbage, Some("src")), 202, garbage);
        let loc = header(&r, "location").expect("Location");
        assert!(path_of(&loc).starts_with("/v2/dst/blobs/uploads/"), "{loc}");
    }
}

// ---- C.33–C.38 push manifests ---------------------------------------------------------

#[test]
fn c33_put_manifest_by_tag_and_by_digest() {
    let s = TesseraServe::start();
    let m = j(&image_manifest(&s, "r", 33));
    let d = sha(&m);
    let r = expect_status(s.put_manifest("r", "v1", OCI_MANIFEST, &m), 201, "PUT tag");
    assert_eq!(header(&r, "docker-content-digest").as_deref(), Some(&*d));
    let loc = header(&r, "location").expect("Location");
    assert!(path_of(&loc).starts_with("/v2/r/manifests/"), "{loc}");
    let r = s
        .client
        .get(s.url(&loc))
        .header("Accept", ACCEPT_ALL_MANIFESTS)
        .send()
        .unwrap();
    assert_eq!(bytes(expect_status(r, 200, "GET Location")), m);

    let m2 = j(&image_manifest(&s, "r", 34));
    let d2 = sha(&m2);
    let r = expect_status(
        s.put_manifest("r", &d2, OCI_MANIFEST, &m2),
        201,
        "PUT digest",
    );
    assert_eq!(header(&r, "docker-content-digest").as_deref(), Some(&*d2));
    assert!(header(&r, "location").is_some());
    assert_eq!(bytes(s.get_manifest("r", &d2)), m2);

    // Digest in the URL does not match the body.
    let m3 = j(&image_manifest(&s, "r", 35));
    let r = s.put_manifest("r", &d2, OCI_MANIFEST, &m3);
    assert_error(r, 400, &["DIGEST_INVALID"]);
    assert_error(s.get_manifest("r", &sha(&m3)), 404, &["MANIFEST_UNKNOWN"]);
    assert_eq!(bytes(s.get_manifest("r", &d2)), m2);
}

#[test]
fn c34_missing_references() {
    let s = TesseraServe::start();
    let good = image_manifest(&s, "r", 340);
    let absent = noise(100, 341);
    // Missing config.
    let mut m = good.clone();
    m["config"] = desc(OCI_CONFIG, &absent);
    assert_error(
        s.put_manifest("r", "nocfg", OCI_MANIFEST, &j(&m)),
        400,
        &["MANIFEST_BLOB_UNKNOWN"],
    );
    // Missing layer (one present, one absent).
    let mut m = good.clone();
    m["layers"]
        .as_array_mut()
        .unwrap()
        .push(desc(OCI_LAYER_GZIP, &absent));
    assert_error(
        s.put_manifest("r", "nolayer", OCI_MANIFEST, &j(&m)),
        400,
        &["MANIFEST_BLOB_UNKNOWN"],
    );
    // Docker schema2 with a missing layer.
    let dm = j(&json!({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": good["config"]["digest"], "size": good["config"]["size"]},
        "layers": [desc(DOCKER_LAYER, &absent)],
    }));
    assert_error(
        s.put_manifest("r", "docker", DOCKER_MANIFEST, &dm),
        400,
        &["MANIFEST_BLOB_UNKNOWN"],
    );
    for tag in ["nocfg", "nolayer", "docker"] {
        assert_eq!(s.get_manifest("r", tag).status(), 404, "{tag} was stored");
    }

    // Missing subject: accepted.
    let subject = json!({"mediaType": OCI_MANIFEST, "digest": sha(&absent), "size": 100});
    let a = artifact(
        &s,
        "r",
        "application/vnd.example.sig.v1",
        Some(subject),
        None,
    );
    let r = expect_status(
        s.put_manifest("r", &sha(&a), OCI_MANIFEST, &a),
        201,
        "missing subject",
    );
    assert_eq!(header(&r, "oci-subject"), Some(sha(&absent)));

    // Sparse index: children not pushed.
    let idx = j(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": sha(b"child1"), "size": 6,
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": sha(b"child2"), "size": 6,
             "platform": {"architecture": "arm64", "os": "linux"}},
        ],
    }));
    round_trip(&s, "r", "sparse", OCI_INDEX, &idx);

    // Non-distributable layers need not be pushed.
    let mut m = good.clone();
    m["layers"].as_array_mut().unwrap().push(json!({
        "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "digest": sha(b"foreign oci"), "size": 11,
        "urls": ["https://example.com/layer.tar.gz"],
    }));
    round_trip(&s, "r", "nondist", OCI_MANIFEST, &j(&m));
    let dm = j(&json!({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": good["config"]["digest"], "size": good["config"]["size"]},
        "layers": [{
            "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "digest": sha(b"foreign docker"), "size": 14,
            "urls": ["https://example.com/foreign.tar.gz"],
        }],
    }));
    round_trip(&s, "r", "foreign", DOCKER_MANIFEST, &dm);
}

#[test]
fn c35_invalid_manifests() {
    let s = TesseraServe::start();
    let good = image_manifest(&s, "r", 35);
    let mut bad_config = good.clone();
    bad_config["config"] = json!("nope");
    let mut bad_layers = good.clone();
    bad_layers["layers"] = json!({"not": "a list"});
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("not JSON", OCI_MANIFEST, b"{not json".to_vec()),
        ("empty body", OCI_MANIFEST, Vec::new()),
        ("JSON array", OCI_MANIFEST, b"[]".to_vec()),
        ("config is a string", OCI_MANIFEST, j(&bad_config)),
        ("layers is an object", OCI_MANIFEST, j(&bad_layers)),
        // mediaType in the body differs from Content-Type.
        ("body says manifest, header says index", OCI_INDEX, j(&good)),
        (
            "body says manifest, header says docker",
            DOCKER_MANIFEST,
            j(&good),
        ),
    ];
    for (what, ct, body) in cases {
        eprintln!("case: {what}");
        let r = s.put_manifest("r", "bad", ct, &body);
        assert_error(r, 400, &["MANIFEST_INVALID"]);
    }
    let mut idx_body = good.clone();
    idx_body["mediaType"] = json!(OCI_INDEX);
    assert_error(
        s.put_manifest("r", "bad", OCI_MANIFEST, &j(&idx_body)),
        400,
        &["MANIFEST_INVALID"],
    );
    assert_eq!(s.get_manifest("r", "bad").status(), 404);
}

/// `base` with annotations padding its serialisation to exactly `size` bytes.
fn manifest_of_size(base: &Value, size: usize) -> Vec<u8> {
    let mut m = base.clone();
    let mut ann = serde_json::Map::new();
    let big = "x".repeat(10_000);
    let n = size.saturating_sub(20_000) / 10_020;
    for i in 0..n {
        ann.insert(format!("org.example.a{i:04}"), json!(big));
    }
    ann.insert("org.example.pad".into(), json!(""));
    m["annotations"] = Value::Object(ann.clone());
    let len = j(&m).len();
    assert!(len <= size, "{len} > {size}");
    ann.insert("org.example.pad".into(), json!("y".repeat(size - len)));
    m["annotations"] = Value::Object(ann);
    let out = j(&m);
    assert_eq!(out.len(), size);
    out
}

#[test]
fn c36_manifest_size_limit() {
    let s = TesseraServe::start();
    let base = image_manifest(&s, "r", 36);
    // ~3.9 MB like the conformance "large-manifest" (390 annotations × 10000 bytes).
    let mut large = base.clone();
    let big = "z".repeat(10_000);
    large["annotations"] = Value::Object(
        (0..390)
            .map(|i| (format!("org.example.large.{i}"), json!(big)))
            .collect(),
    );
    round_trip(&s, "r", "large", OCI_MANIFEST, &j(&large));
    // Exactly the default limit, then one byte more.
    let at_limit = manifest_of_size(&base, 4_194_304);
    round_trip(&s, "r", "limit", OCI_MANIFEST, &at_limit);
    let over = manifest_of_size(&base, 4_194_305);
    // Raw socket: the reply may come before the body is read.
    let (status, text) =
        raw_request_with_body(&s.addr, "PUT", "/v2/r/manifests/over", OCI_MANIFEST, &over);
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("SIZE_INVALID"), "{text}");
    assert_error(s.get_manifest("r", "over"), 404, &["MANIFEST_UNKNOWN"]);
}

/// An ordinary HTTP client (reqwest, keep-alive pool) pushing an oversized manifest
/// must see the 413, and its next request must work: the server has to drain the
/// body, or close with `Connection: close` without resetting the connection under
/// the client's write. Repeated because the failure depends on timing.
#[test]
fn c36_oversized_manifest_reply_reaches_http_client() {
    let s = TesseraServe::start();
    let base = image_manifest(&s, "r", 361);
    let over = manifest_of_size(&base, 4_194_305);
    for i in 0..20 {
        let r = s
            .client
            .put(s.url("/v2/r/manifests/over"))
            .header("Content-Type", OCI_MANIFEST)
            .body(over.clone())
            .send()
            .unwrap_or_else(|e| panic!("attempt {i}: PUT of the oversized manifest: {e:?}"));
        assert_error(r, 413, &["SIZE_INVALID"]);
        let r = s
            .client
            .get(s.url("/v2/r/manifests/over"))
            .header("Accept", ACCEPT_ALL_MANIFESTS)
            .send()
            .unwrap_or_else(|e| {
                panic!("attempt {i}: request after the 413 on a reused connection: {e:?}")
            });
        assert_error(r, 404, &["MANIFEST_UNKNOWN"]);
    }
}

#[test]
fn c36_max_manifest_bytes_flag() {
    let s = TesseraServe::start_args(&["--max-manifest-bytes", "2000"]);
    let base = image_manifest(&s, "r", 360);
    round_trip(&s, "r", "ok", OCI_MANIFEST, &manifest_of_size(&base, 2000));
    assert_error(
        s.put_manifest("r", "big", OCI_MANIFEST, &manifest_of_size(&base, 2001)),
        413,
        &["SIZE_INVALID"],
    );
}

#[test]
fn c37_round_trip_oci_data_sets() {
    let s = TesseraServe::start();
    let repo = "data/sets";
    // Image.
    let img = j(&image_manifest(&s, repo, 370));
    round_trip(&s, repo, "image", OCI_MANIFEST, &img);
    // Uncompressed layer.
    let mut v = image_manifest(&s, repo, 371);
    v["layers"][0]["mediaType"] = json!(OCI_LAYER_TAR);
    let uncompressed = j(&v);
    round_trip(&s, repo, "uncompressed", OCI_MANIFEST, &uncompressed);
    // No layers.
    let mut v = image_manifest(&s, repo, 372);
    v["layers"] = json!([]);
    round_trip(&s, repo, "no-layers", OCI_MANIFEST, &j(&v));
    // Multi-platform index.
    let mut p1 = desc(OCI_MANIFEST, &img);
    p1["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let mut p2 = desc(OCI_MANIFEST, &uncompressed);
    p2["platform"] = json!({"architecture": "arm64", "os": "linux", "variant": "v8"});
    let index = j(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [p1, p2]}));
    round_trip(&s, repo, "index", OCI_INDEX, &index);
    // Nested index.
    let nested = j(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [desc(OCI_INDEX, &index), desc(OCI_MANIFEST, &img)],
    }));
    round_trip(&s, repo, "nested", OCI_INDEX, &nested);
    // Empty index.
    let empty = j(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}));
    round_trip(&s, repo, "empty-index", OCI_INDEX, &empty);
    // Artifact with the empty config.
    let art = artifact(&s, repo, "application/vnd.example.thing.v1", None, None);
    round_trip(&s, repo, "artifact", OCI_MANIFEST, &art);
    // Artifact without layers.
    let bare = j(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.bare.v1",
        "config": empty_config(), "layers": [],
    }));
    round_trip(&s, repo, "artifact-no-layers", OCI_MANIFEST, &bare);
    // Artifact index.
    let art_idx = j(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "artifactType": "application/vnd.example.bundle.v1",
        "manifests": [desc(OCI_MANIFEST, &art), desc(OCI_MANIFEST, &bare)],
    }));
    round_trip(&s, repo, "artifact-index", OCI_INDEX, &art_idx);
    // Descriptor with embedded `data`.
    s.push_blob(repo, b"{}");
    let mut v = image_manifest(&s, repo, 373);
    v["config"] =
        json!({"mediaType": OCI_EMPTY, "digest": EMPTY_JSON_DIGEST, "size": 2, "data": "e30="});
    round_trip(&s, repo, "data-field", OCI_MANIFEST, &j(&v));
    let v = json_body(s.get(&format!("/v2/{repo}/tags/list")));
    assert_eq!(tags_of(&v).len(), 10);
}

#[test]
fn c37_round_trip_docker_schema2() {
    let s = TesseraServe::start();
    let repo = "docker/img";
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer = noise(4000, 375);
    s.push_blob(repo, config);
    s.push_blob(repo, &layer);
    let m = j(&json!({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": desc(DOCKER_CONFIG, config),
        "layers": [desc(DOCKER_LAYER, &layer)],
    }));
    round_trip(&s, repo, "v2", DOCKER_MANIFEST, &m);
    let mut entry = desc(DOCKER_MANIFEST, &m);
    entry["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let list = j(&json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [entry]}));
    round_trip(&s, repo, "list", DOCKER_LIST, &list);
    // Docker clients ask with only the docker types.
    let r = s
        .client
        .get(s.url(&format!("/v2/{repo}/manifests/list")))
        .header("Accept", format!("{DOCKER_MANIFEST}, {DOCKER_LIST}"))
        .send()
        .unwrap();
    let r = expect_status(r, 200, "docker Accept");
    assert_eq!(header(&r, "content-type").as_deref(), Some(DOCKER_LIST));
    assert_eq!(bytes(r), list);
}

#[test]
fn c37_unknown_fields_preserved() {
    let s = TesseraServe::start();
    let v = image_manifest(&s, "r", 376);
    // Unusual key order, unknown fields at every level, odd spacing.
    let text = format!(
        "{{ \"x-custom\" : {{\"nested\": [1, 2.50, \"\\u00e9\"]}},\n\t\"layers\": [{{\"x-extra\": true, \"size\": {}, \"digest\": \"{}\", \"mediaType\": \"{}\"}}],\n \"config\": {},\n \"mediaType\": \"{OCI_MANIFEST}\", \"schemaVersion\": 2 }}\n",
        v["layers"][0]["size"],
        v["layers"][0]["digest"].as_str().unwrap(),
        v["layers"][0]["mediaType"].as_str().unwrap(),
        v["config"],
    );
    round_trip(&s, "r", "custom", OCI_MANIFEST, text.as_bytes());
}

#[test]
fn c38_retag_moves_the_tag() {
    let s = TesseraServe::start();
    let (m1, d1) = push_image(&s, "r", "latest", 381);
    let (m2, d2) = push_image(&s, "r", "latest", 382);
    assert_ne!(d1, d2);
    let r = expect_status(s.get_manifest("r", "latest"), 200, "latest");
    assert_eq!(header(&r, "docker-content-digest").as_deref(), Some(&*d2));
    assert_eq!(bytes(r), m2);
    assert_eq!(
        bytes(expect_status(s.get_manifest("r", &d1), 200, "old")),
        m1
    );
    let v = json_body(s.get("/v2/r/tags/list"));
    assert_eq!(tags_of(&v), vec!["latest"]);
}

// ---- C.40–C.46 referrers --------------------------------------------------------------

fn referrers(
    s: &TesseraServe,
    repo: &str,
    digest: &str,
    artifact_type: Option<&str>,
) -> reqwest::blocking::Response {
    let mut url = s.url(&format!("/v2/{repo}/referrers/{digest}"));
    if let Some(t) = artifact_type {
        url = with_query(&url, "artifactType", t);
    }
    s.client.get(url).send().unwrap()
}

/// The referrers reply: 200, index Content-Type, index body; returns `manifests`.
#[track_caller]
fn referrer_list(r: reqwest::blocking::Response) -> Vec<Value> {
    let r = expect_status(r, 200, "GET referrers");
    assert_eq!(header(&r, "content-type").as_deref(), Some(OCI_INDEX));
    let v = json_body(r);
    assert_eq!(v["schemaVersion"], 2, "{v}");
    assert_eq!(v["mediaType"], OCI_INDEX, "{v}");
    v["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("no manifests array: {v}"))
        .clone()
}

fn subject_of(m: &[u8], media_type: &str) -> Value {
    desc(media_type, m)
}

#[test]
fn c40_put_with_subject_returns_oci_subject() {
    let s = TesseraServe::start();
    let (img, d) = push_image(&s, "r", "v1", 40);
    let r = expect_status(s.put_manifest("r", "plain", OCI_MANIFEST, &img), 201, "PUT");
    assert_eq!(
        header(&r, "oci-subject"),
        None,
        "no subject, no OCI-Subject"
    );
    let a = artifact(
        &s,
        "r",
        "application/vnd.example.sig.v1",
        Some(subject_of(&img, OCI_MANIFEST)),
        None,
    );
    let r = expect_status(s.put_manifest("r", &sha(&a), OCI_MANIFEST, &a), 201, "PUT");
    assert_eq!(header(&r, "oci-subject").as_deref(), Some(&*d));
    let idx = j(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "artifactType": "application/vnd.example.bundle.v1",
        "manifests": [], "subject": subject_of(&img, OCI_MANIFEST),
    }));
    let r = expect_status(
        s.put_manifest("r", "bundle", OCI_INDEX, &idx),
        201,
        "PUT index",
    );
    assert_eq!(header(&r, "oci-subject").as_deref(), Some(&*d));
}

#[test]
fn c41_referrers_empty_list_shape() {
    let s = TesseraServe::start();
    let (_, d) = push_image(&s, "r", "v1", 41);
    for digest in [d.clone(), sha(b"never pushed")] {
        let r = referrers(&s, "r", &digest, None);
        assert_eq!(header(&r, "oci-filters-applied"), None);
        let r = expect_status(r, 200, "referrers");
        assert_eq!(header(&r, "content-type").as_deref(), Some(OCI_INDEX));
        assert_eq!(
            json_body(r),
            json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
        );
    }
}

/// A referrer's bytes, media type, expected artifactType and annotations.
type Expected<'a> = (&'a [u8], &'a str, Option<&'a str>, Option<Value>);

#[test]
fn c42_c45_referrer_descriptors() {
    let s = TesseraServe::start();
    let (img, d) = push_image(&s, "r", "v1", 42);
    let subject = subject_of(&img, OCI_MANIFEST);
    // 1. Artifact with artifactType and annotations.
    let ann =
        json!({"org.opencontainers.image.created": "2024-01-01T00:00:00Z", "org.example.k": "v"});
    let sbom = artifact(
        &s,
        "r",
        "application/vnd.example.sbom.v1",
        Some(subject.clone()),
        Some(ann.clone()),
    );
    s.push_manifest("r", &sha(&sbom), OCI_MANIFEST, &sbom);
    // 2. Manifest without artifactType: the config media type stands in.
    let cfg = br#"{"kind":"signature"}"#;
    s.push_blob("r", cfg);
    let sig = j(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": desc("application/vnd.example.sig.config.v1+json", cfg),
        "layers": [], "subject": subject,
    }));
    s.push_manifest("r", &sha(&sig), OCI_MANIFEST, &sig);
    // 3. Index with artifactType; 4. index without (no artifactType in descriptor).
    let idx_typed = j(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "artifactType": "application/vnd.example.bundle.v1",
        "manifests": [desc(OCI_MANIFEST, &sbom)], "subject": subject,
        "annotations": {"org.example.idx": "1"},
    }));
    s.push_manifest("r", &sha(&idx_typed), OCI_INDEX, &idx_typed);
    let idx_plain = j(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [], "subject": subject,
    }));
    s.push_manifest("r", &sha(&idx_plain), OCI_INDEX, &idx_plain);
    // Not a referrer: same repo, no subject.
    push_image(&s, "r", "unrelated", 43);

    let r = referrers(&s, "r", &d, None);
    assert_eq!(
        header(&r, "link"),
        None,
        "C.45: four referrers fit in one page"
    );
    let list = referrer_list(r);
    assert_eq!(list.len(), 4, "{list:?}");
    let expect: [Expected; 4] = [
        (
            &sbom,
            OCI_MANIFEST,
            Some("application/vnd.example.sbom.v1"),
            Some(ann),
        ),
        (
            &sig,
            OCI_MANIFEST,
            Some("application/vnd.example.sig.config.v1+json"),
            None,
        ),
        (
            &idx_typed,
            OCI_INDEX,
            Some("application/vnd.example.bundle.v1"),
            Some(json!({"org.example.idx": "1"})),
        ),
        (&idx_plain, OCI_INDEX, None, None),
    ];
    for (bytes, mt, at, ann) in expect {
        let dg = sha(bytes);
        let got = list
            .iter()
            .find(|e| e["digest"] == json!(dg))
            .unwrap_or_else(|| panic!("{dg} ({mt}, {at:?}) missing from {list:?}"));
        assert_eq!(got["mediaType"], json!(mt), "{got}");
        assert_eq!(got["size"], json!(bytes.len()), "{got}");
        match at {
            Some(t) => assert_eq!(got["artifactType"], json!(t), "{got}"),
            None => assert!(got.get("artifactType").is_none_or(|v| v.is_null()), "{got}"),
        }
        match ann {
            Some(a) => assert_eq!(got["annotations"], a, "{got}"),
            None => assert!(
                got.get("annotations")
                    .is_none_or(|v| v.is_null() || v == &json!({})),
                "{got}"
            ),
        }
    }
    // Referrers are per repository.
    s.push_blob("other", b"x");
    assert!(referrer_list(referrers(&s, "other", &d, None)).is_empty());
}

#[test]
fn c43_referrers_artifact_type_filter() {
    let s = TesseraServe::start();
    let (img, d) = push_image(&s, "r", "v1", 43);
    let subject = subject_of(&img, OCI_MANIFEST);
    let mut by_type: Vec<(String, String)> = Vec::new();
    for (i, t) in [
        "application/vnd.example.sbom.v1",
        "application/vnd.example.sig.v1+json",
        "application/vnd.example.sbom.v1",
    ]
    .iter()
    .enumerate()
    {
        let a = artifact(
            &s,
            "r",
            t,
            Some(subject.clone()),
            Some(json!({"i": i.to_string()})),
        );
        by_type.push((
            t.to_string(),
            s.push_manifest("r", &sha(&a), OCI_MANIFEST, &a),
        ));
    }
    for t in [
        "application/vnd.example.sbom.v1",
        "application/vnd.example.sig.v1+json",
        "application/vnd.example.none",
    ] {
        let r = referrers(&s, "r", &d, Some(t));
        assert_eq!(
            header(&r, "oci-filters-applied").as_deref(),
            Some("artifactType"),
            "{t}"
        );
        let mut got: Vec<String> = referrer_list(r)
            .iter()
            .map(|e| {
                assert_eq!(e["artifactType"], json!(t));
                e["digest"].as_str().unwrap().to_string()
            })
            .collect();
        got.sort();
        let mut want: Vec<String> = by_type
            .iter()
            .filter(|(bt, _)| bt == t)
            .map(|(_, d)| d.clone())
            .collect();
        want.sort();
        assert_eq!(got, want, "filter {t}");
    }
    let r = referrers(&s, "r", &d, None);
    assert_eq!(header(&r, "oci-filters-applied"), None);
    assert_eq!(referrer_list(r).len(), 3);
}

#[test]
fn c44_referrers_invalid_digest() {
    let s = TesseraServe::start();
    push_image(&s, "r", "v1", 44);
    for bad in ["sha256:totallywrong", "latest", "sha256:"] {
        assert_error(referrers(&s, "r", bad, None), 400, &["DIGEST_INVALID"]);
    }
}

#[test]
fn c46_referrer_before_subject_and_deletion() {
    let s = TesseraServe::start();
    // Subject bytes known, not pushed yet.
    let img = j(&image_manifest(&s, "r", 46));
    let d = sha(&img);
    let subject = subject_of(&img, OCI_MANIFEST);
    let a1 = artifact(
        &s,
        "r",
        "application/vnd.example.a.v1",
        Some(subject.clone()),
        None,
    );
    let a2 = artifact(&s, "r", "application/vnd.example.b.v1", Some(subject), None);
    let d1 = sha(&a1);
    let d2 = sha(&a2);
    let r = expect_status(
        s.put_manifest("r", &d1, OCI_MANIFEST, &a1),
        201,
        "referrer first",
    );
    assert_eq!(header(&r, "oci-subject").as_deref(), Some(&*d));
    s.push_manifest("r", "sig", OCI_MANIFEST, &a2);
    let digests = |s: &TesseraServe| {
        let mut v: Vec<String> = referrer_list(referrers(s, "r", &d, None))
            .iter()
            .map(|e| e["digest"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    let mut both = vec![d1.clone(), d2.clone()];
    both.sort();
    assert_eq!(
        digests(&s),
        both,
        "referrers listed before the subject exists"
    );
    s.push_manifest("r", "v1", OCI_MANIFEST, &img);
    assert_eq!(digests(&s), both);
    // Deleting only the tag of a referrer keeps the manifest, hence the referrer.
    expect_status(s.delete("/v2/r/manifests/sig"), 202, "DELETE tag");
    assert_eq!(digests(&s), both);
    // Deleting a referrer manifest removes it.
    expect_status(
        s.delete(&format!("/v2/r/manifests/{d1}")),
        202,
        "DELETE referrer",
    );
    assert_eq!(digests(&s), vec![d2.clone()]);
    // Deleting the subject: the list stays a 200 index.
    expect_status(
        s.delete(&format!("/v2/r/manifests/{d}")),
        202,
        "DELETE subject",
    );
    referrer_list(referrers(&s, "r", &d, None));
}

// ---- C.48–C.53 tags and catalog -------------------------------------------------------

#[test]
fn c48_tags_list_shape_and_empty_repository() {
    let s = TesseraServe::start();
    let (m, _) = push_image(&s, "lib/r", "v1", 48);
    s.push_manifest("lib/r", "v2", OCI_MANIFEST, &m);
    let r = expect_status(s.get("/v2/lib/r/tags/list"), 200, "tags");
    assert_eq!(json_body(r), json!({"name": "lib/r", "tags": ["v1", "v2"]}));
    // Existing repository whose tags were all deleted: 200 with an empty list.
    expect_status(s.delete("/v2/lib/r/manifests/v1"), 202, "DELETE v1");
    expect_status(s.delete("/v2/lib/r/manifests/v2"), 202, "DELETE v2");
    let r = expect_status(s.get("/v2/lib/r/tags/list"), 200, "empty tags");
    assert_eq!(json_body(r), json!({"name": "lib/r", "tags": []}));
    assert_error(s.get("/v2/lib/nope/tags/list"), 404, &["NAME_UNKNOWN"]);
}

#[test]
fn c49_tags_sorted() {
    let s = TesseraServe::start();
    let m = j(&image_manifest(&s, "r", 49));
    let tags = [
        "b", "A", "a", "Z", "1", "_x", "a.b", "a-b", "a_b", "10", "9",
    ];
    for t in tags {
        s.push_manifest("r", t, OCI_MANIFEST, &m);
    }
    let mut want: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    want.sort();
    assert_eq!(tags_of(&json_body(s.get("/v2/r/tags/list"))), want);
}

#[test]
fn c50_c52_tags_pagination() {
    let s = TesseraServe::start();
    let m = j(&image_manifest(&s, "r", 50));
    for t in ["e", "c", "a", "d", "b"] {
        s.push_manifest("r", t, OCI_MANIFEST, &m);
    }
    let page = |q: &str| {
        let r = expect_status(s.get(&format!("/v2/r/tags/list{q}")), 200, q);
        let link = header(&r, "link");
        (tags_of(&json_body(r)), link)
    };
    // C.50: n=k gives k, with Link while more remain.
    let (t, link) = page("?n=2");
    assert_eq!(t, ["a", "b"]);
    assert_eq!(
        link.as_deref(),
        Some("</v2/r/tags/list?n=2&last=b>; rel=\"next\"")
    );
    // Following the Link.
    let next = link.unwrap();
    let next = next
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap()
        .to_string();
    let r = expect_status(s.get(&next), 200, &next);
    let link = header(&r, "link");
    assert_eq!(tags_of(&json_body(r)), ["c", "d"]);
    assert_eq!(
        link.as_deref(),
        Some("</v2/r/tags/list?n=2&last=d>; rel=\"next\"")
    );
    let (t, link) = page("?n=2&last=d");
    assert_eq!(t, ["e"]);
    assert_eq!(link, None, "last page has no Link");
    // Exactly the remaining count: no Link either.
    let (t, link) = page("?n=5");
    assert_eq!(t, ["a", "b", "c", "d", "e"]);
    assert_eq!(link, None);
    let (t, link) = page("?n=3&last=b");
    assert_eq!(t, ["c", "d", "e"]);
    assert_eq!(link, None);
    // n=0: empty, no Link.
    let (t, link) = page("?n=0");
    assert!(t.is_empty());
    assert_eq!(link, None);
    // C.51: last is exclusive, allowed without n, need not exist.
    assert_eq!(page("?last=b").0, ["c", "d", "e"]);
    assert_eq!(page("?last=bb").0, ["c", "d", "e"]);
    assert_eq!(page("?last=0").0, ["a", "b", "c", "d", "e"]);
    assert!(page("?last=e").0.is_empty());
    assert_eq!(page("?n=1&last=c").0, ["d"]);
    // C.52: large n is clamped or refused with an OCI code.
    let r = s.get("/v2/r/tags/list?n=100000");
    if r.status() == 200 {
        assert_eq!(tags_of(&json_body(r)), ["a", "b", "c", "d", "e"]);
    } else {
        assert_error(r, 400, OCI_ERROR_CODES);
    }
    // Malformed n.
    assert_error(s.get("/v2/r/tags/list?n=abc"), 400, OCI_ERROR_CODES);
}

#[test]
fn c53_catalog() {
    let s = TesseraServe::start();
    for (i, repo) in ["gamma", "alpha", "beta/one", "beta"].iter().enumerate() {
        push_image(&s, repo, "v1", 530 + i as u64);
    }
    let all = ["alpha", "beta", "beta/one", "gamma"];
    let r = expect_status(s.get("/v2/_catalog"), 200, "catalog");
    assert_eq!(header(&r, "link"), None);
    assert_eq!(json_body(r), json!({"repositories": all}));
    // Walk with n=1 through the Link chain.
    let mut url = "/v2/_catalog?n=1".to_string();
    let mut seen = Vec::new();
    for _ in 0..10 {
        let r = expect_status(s.get(&url), 200, &url);
        let link = header(&r, "link");
        let v = json_body(r);
        let page = v["repositories"].as_array().unwrap().clone();
        assert!(page.len() <= 1, "n=1 gave {v}");
        seen.extend(page.iter().map(|x| x.as_str().unwrap().to_string()));
        match link {
            Some(l) => {
                assert!(
                    l.starts_with("</v2/_catalog?") && l.ends_with(">; rel=\"next\""),
                    "{l}"
                );
                url = l[1..l.find('>').unwrap()].to_string();
            }
            None => break,
        }
    }
    assert_eq!(seen, all);
    let r = expect_status(s.get("/v2/_catalog?n=2"), 200, "n=2");
    assert!(header(&r, "link").is_some());
    assert_eq!(json_body(r)["repositories"], json!(["alpha", "beta"]));
    let r = expect_status(s.get("/v2/_catalog?n=2&last=beta"), 200, "last=beta");
    assert_eq!(header(&r, "link"), None);
    assert_eq!(json_body(r)["repositories"], json!(["beta/one", "gamma"]));
    let r = expect_status(s.get("/v2/_catalog?n=0"), 200, "n=0");
    assert_eq!(header(&r, "link"), None);
    assert_eq!(json_body(r)["repositories"], json!([]));
}

// ---- C.54–C.58 deletion ---------------------------------------------------------------

#[test]
fn c54_delete_manifest_by_tag() {
    let s = TesseraServe::start();
    let (m, d) = push_image(&s, "r", "v1", 54);
    s.push_manifest("r", "v2", OCI_MANIFEST, &m);
    let r = expect_status(s.delete("/v2/r/manifests/v1"), 202, "DELETE tag");
    drop(r);
    assert_error(s.get_manifest("r", "v1"), 404, &["MANIFEST_UNKNOWN"]);
    assert_eq!(
        bytes(expect_status(s.get_manifest("r", &d), 200, "by digest")),
        m
    );
    assert_eq!(
        bytes(expect_status(s.get_manifest("r", "v2"), 200, "v2")),
        m
    );
    assert_eq!(tags_of(&json_body(s.get("/v2/r/tags/list"))), ["v2"]);
    assert_error(s.delete("/v2/r/manifests/v1"), 404, &["MANIFEST_UNKNOWN"]);
}

#[test]
fn c55_delete_manifest_by_digest() {
    let s = TesseraServe::start();
    let (m, d) = push_image(&s, "r", "v1", 55);
    s.push_manifest("r", "v2", OCI_MANIFEST, &m);
    let (m3, _) = push_image(&s, "r", "other", 56);
    expect_status(
        s.delete(&format!("/v2/r/manifests/{d}")),
        202,
        "DELETE digest",
    );
    assert_error(s.get_manifest("r", &d), 404, &["MANIFEST_UNKNOWN"]);
    assert_eq!(s.head_manifest("r", &d).status(), 404);
    for t in ["v1", "v2"] {
        assert_error(s.get_manifest("r", t), 404, &["MANIFEST_UNKNOWN"]);
    }
    assert_eq!(tags_of(&json_body(s.get("/v2/r/tags/list"))), ["other"]);
    assert_eq!(bytes(s.get_manifest("r", "other")), m3);
    assert_error(
        s.delete(&format!("/v2/r/manifests/{d}")),
        404,
        &["MANIFEST_UNKNOWN"],
    );
    // It can be pushed again.
    s.push_manifest("r", "v1", OCI_MANIFEST, &m);
    assert_eq!(bytes(s.get_manifest("r", &d)), m);
}

#[test]
fn c56_delete_blob() {
    let s = TesseraServe::start();
    let data = noise(5000, 56);
    let d = s.push_blob("r", &data);
    s.push_blob("keep", &data);
    expect_status(s.delete(&format!("/v2/r/blobs/{d}")), 202, "DELETE blob");
    assert_error(s.get(&format!("/v2/r/blobs/{d}")), 404, &["BLOB_UNKNOWN"]);
    assert_eq!(s.head(&format!("/v2/r/blobs/{d}")).status(), 404);
    assert_error(
        s.delete(&format!("/v2/r/blobs/{d}")),
        404,
        &["BLOB_UNKNOWN"],
    );
    assert_error(
        s.delete(&format!("/v2/r/blobs/{}", sha(b"never"))),
        404,
        &["BLOB_UNKNOWN"],
    );
    // Only the link in `r` went away.
    assert_eq!(
        bytes(expect_status(
            s.get(&format!("/v2/keep/blobs/{d}")),
            200,
            "keep"
        )),
        data
    );
    // Re-push works.
    s.push_blob("r", &data);
    assert_eq!(bytes(s.get(&format!("/v2/r/blobs/{d}"))), data);
}

#[test]
fn c56_delete_disabled_is_405_unsupported() {
    let s = TesseraServe::start_args(&["--no-delete"]);
    let (m, d) = push_image(&s, "r", "v1", 561);
    let b = s.push_blob("r", b"blob");
    for path in [
        "/v2/r/manifests/v1".to_string(),
        format!("/v2/r/manifests/{d}"),
        format!("/v2/r/blobs/{b}"),
    ] {
        assert_error(s.delete(&path), 405, &["UNSUPPORTED"]);
    }
    assert_eq!(
        bytes(expect_status(s.get_manifest("r", "v1"), 200, "v1")),
        m
    );
    expect_status(s.get(&format!("/v2/r/blobs/{b}")), 200, "blob");
}

#[test]
fn c57_delete_orders() {
    let s = TesseraServe::start();
    for (repo, manifest_first) in [("mfirst", true), ("bfirst", false)] {
        let v = image_manifest(&s, repo, 57);
        let m = j(&v);
        let d = s.push_manifest(repo, "v1", OCI_MANIFEST, &m);
        let blobs = [
            v["config"]["digest"].as_str().unwrap().to_string(),
            v["layers"][0]["digest"].as_str().unwrap().to_string(),
        ];
        let del_manifest = || {
            expect_status(
                s.delete(&format!("/v2/{repo}/manifests/{d}")),
                202,
                "DELETE manifest",
            );
        };
        if manifest_first {
            del_manifest();
        }
        for b in &blobs {
            expect_status(
                s.delete(&format!("/v2/{repo}/blobs/{b}")),
                202,
                "DELETE blob",
            );
        }
        if !manifest_first {
            del_manifest();
        }
        assert_eq!(s.get_manifest(repo, &d).status(), 404);
        assert_eq!(s.get_manifest(repo, "v1").status(), 404);
        for b in &blobs {
            assert_eq!(s.get(&format!("/v2/{repo}/blobs/{b}")).status(), 404);
        }
    }
}

#[test]
fn c58_delete_blob_still_referenced() {
    let s = TesseraServe::start();
    let v = image_manifest(&s, "r", 58);
    let m = j(&v);
    s.push_manifest("r", "v1", OCI_MANIFEST, &m);
    let layer = v["layers"][0]["digest"].as_str().unwrap();
    expect_status(
        s.delete(&format!("/v2/r/blobs/{layer}")),
        202,
        "DELETE referenced blob",
    );
    assert_error(
        s.get(&format!("/v2/r/blobs/{layer}")),
        404,
        &["BLOB_UNKNOWN"],
    );
    assert_eq!(
        bytes(expect_status(s.get_manifest("r", "v1"), 200, "manifest")),
        m
    );
}

// ---- process lifecycle ----------------------------------------------------------------

#[test]
fn serve_stops_gracefully_on_sigterm_and_sigint() {
    for sig in [rustix::process::Signal::TERM, rustix::process::Signal::INT] {
        let mut s = TesseraServe::start();
        expect_status(s.get("/v2/"), 200, "GET /v2/");
        s.signal(sig);
        let st = s
            .wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{sig:?}: still running after 10 s"));
        assert!(st.success(), "{sig:?}: exit status {st}\n{}", s.stderr());
    }
}

// ---- regressions of the registry review (issue 10) ------------------------------------

/// GET/HEAD/DELETE of a manifest by a reference that is neither a tag nor a digest is a
/// manifest that does not exist: 404, while a PUT with it stays 400.
#[test]
fn manifest_reference_neither_tag_nor_digest_is_404() {
    let s = TesseraServe::start();
    let (m, _) = push_image(&s, "r", "v1", 901);
    let too_long = "c".repeat(129);
    for bad in [".x", "-x", "a+b", too_long.as_str(), "sha256:totallywrong"] {
        assert_error(s.get_manifest("r", bad), 404, &["MANIFEST_UNKNOWN"]);
        assert_eq!(s.head_manifest("r", bad).status(), 404, "HEAD {bad}");
        assert_error(
            s.delete(&format!("/v2/r/manifests/{bad}")),
            404,
            &["MANIFEST_UNKNOWN"],
        );
        let r = s.put_manifest("r", bad, OCI_MANIFEST, &m);
        assert_error(r, 400, &["TAG_INVALID", "DIGEST_INVALID"]);
    }
}

fn walk_catalog(s: &TesseraServe, user: Option<(&str, &str)>, n: usize) -> Vec<String> {
    let mut url = format!("/v2/_catalog?n={n}");
    let mut seen = Vec::new();
    for _ in 0..20 {
        let mut rq = s.client.get(s.url(&url));
        if let Some((u, p)) = user {
            rq = rq.basic_auth(u, Some(p));
        }
        let r = expect_status(rq.send().unwrap(), 200, &url);
        let link = header(&r, "link");
        let page = json_body(r)["repositories"].as_array().unwrap().clone();
        assert!(
            !page.is_empty() || link.is_none(),
            "{url}: empty page with a next link"
        );
        assert!(page.len() <= n, "{url}: {page:?}");
        seen.extend(page.iter().map(|x| x.as_str().unwrap().to_string()));
        match link {
            Some(l) => url = l[1..l.find('>').unwrap()].to_string(),
            None => return seen,
        }
    }
    panic!("catalog walk did not end: {seen:?}");
}

/// The catalog lists what the caller may read, filtered before paging: the first page
/// of an anonymous caller is the first repository it can read, not an empty page.
#[test]
fn catalog_pages_only_readable_repositories_without_short_pages() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    {
        let s = TesseraServe::start_in(&root, &[]);
        for (i, repo) in ["alpha", "beta", "gamma", "zeta", "zulu"]
            .iter()
            .enumerate()
        {
            push_image(&s, repo, "v1", 910 + i as u64);
        }
    }
    let (_d, htpasswd) = write_htpasswd();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "htpasswd = \"{}\"\n\n[[access]]\naccount = \"anonymous\"\nrepository = \"z*\"\nactions = [\"pull\"]\n\n[[access]]\naccount = \"alice\"\nrepository = \"*\"\nactions = [\"pull\", \"push\", \"delete\"]\n",
            htpasswd.display()
        ),
    )
    .unwrap();
    let s = TesseraServe::start_in(&root, &["--config", cfg.to_str().unwrap()]);
    let r = expect_status(s.get("/v2/_catalog?n=1"), 200, "anonymous n=1");
    assert!(header(&r, "link").is_some(), "zulu follows");
    assert_eq!(json_body(r)["repositories"], json!(["zeta"]));
    assert_eq!(walk_catalog(&s, None, 1), ["zeta", "zulu"]);
    assert_eq!(walk_catalog(&s, None, 2), ["zeta", "zulu"]);
    let r = expect_status(s.get("/v2/_catalog?n=2"), 200, "anonymous n=2");
    assert_eq!(header(&r, "link"), None, "nothing readable follows");
    assert_eq!(
        walk_catalog(&s, Some(("alice", "s3cret")), 2),
        ["alpha", "beta", "gamma", "zeta", "zulu"]
    );
}

/// A repository whose manifests are all deleted leaves the catalog.
#[test]
fn catalog_drops_a_repository_without_manifests() {
    let s = TesseraServe::start();
    let (_, d) = push_image(&s, "gone", "v1", 920);
    push_image(&s, "kept", "v1", 921);
    assert_eq!(walk_catalog(&s, None, 10), ["gone", "kept"]);
    expect_status(s.delete(&format!("/v2/gone/manifests/{d}")), 202, "DELETE");
    assert_eq!(walk_catalog(&s, None, 10), ["kept"]);
    assert_eq!(walk_catalog(&s, None, 1), ["kept"]);
}

/// Wait until the server closes `sock` (EOF or reset), at most `limit`.
#[track_caller]
fn closed_within(sock: &mut std::net::TcpStream, limit: Duration, what: &str) {
    use std::io::Read;
    let start = std::time::Instant::now();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
        assert!(
            start.elapsed() < limit,
            "{what}: still open after {limit:?}"
        );
    }
}

/// Clients that never finish their request headers cannot take the server down: with
/// more stalled connections than `--max-connections`, a normal request is still
/// answered, and the stalled ones are closed after `--header-read-timeout`; idle
/// connections (nothing sent, or between keep-alive requests) after `--idle-timeout`.
#[test]
fn slow_clients_are_timed_out_and_capped() {
    use std::io::Write;
    let s = TesseraServe::start_args(&[
        "--header-read-timeout",
        "2",
        "--idle-timeout",
        "3",
        "--max-connections",
        "16",
    ]);
    let mut stalled = Vec::new();
    for _ in 0..48 {
        let mut c = std::net::TcpStream::connect(&s.addr).unwrap();
        c.write_all(b"GET /v2/ HT").unwrap();
        stalled.push(c);
    }
    let mut silent = std::net::TcpStream::connect(&s.addr).unwrap();
    let t0 = std::time::Instant::now();
    let r = s.client.get(s.url("/v2/")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "answered after {:?}",
        t0.elapsed()
    );
    for (i, c) in stalled.iter_mut().enumerate() {
        closed_within(c, Duration::from_secs(30), &format!("stalled socket {i}"));
    }
    closed_within(&mut silent, Duration::from_secs(30), "silent socket");
    // A keep-alive connection is served, then closed once idle for --idle-timeout
    // (not before the header timeout would have closed it).
    let mut k = std::net::TcpStream::connect(&s.addr).unwrap();
    k.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {}\r\n\r\n", s.addr).as_bytes())
        .unwrap();
    let mut got = Vec::new();
    k.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).ends_with("{}") {
        use std::io::Read;
        let n = k.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed before the reply: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    let idle = std::time::Instant::now();
    closed_within(
        &mut k,
        Duration::from_secs(20),
        "idle keep-alive connection",
    );
    assert!(
        idle.elapsed() >= Duration::from_millis(2500),
        "closed after {:?}, before the idle timeout",
        idle.elapsed()
    );
}

/// Assert an error reply whose first message contains `needle`; returns the body.
#[track_caller]
fn assert_error_says(
    r: reqwest::blocking::Response,
    status: u16,
    codes: &[&str],
    needle: &str,
) -> Value {
    let v = assert_error(r, status, codes);
    let msg = v["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(needle),
        "expected {needle:?} in the message: {v}"
    );
    v
}

const TESSERA_IMAGE: &str = "application/vnd.tessera.image.v1";
const TESSERA_INDEX: &str = "application/vnd.tessera.index.v1";
const TESSERA_PACK: &str = "application/vnd.tessera.pack.v1";

/// Packs are verified by their layer media type whatever the artifactType, and a
/// manifest with pack layers (or tessera's artifactType) needs an index layer.
#[test]
fn tessera_layers_are_verified_whatever_the_artifact_type() {
    let s = TesseraServe::start();
    let pack = b"not a tessera pack".to_vec();
    let index = b"not a tessera index".to_vec();
    s.push_blob("r", &pack);
    s.push_blob("r", &index);
    s.push_blob("r", b"{}");
    let manifest = |artifact: Option<&str>, layers: Vec<Value>| {
        let mut m = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": empty_config(),
            "layers": layers,
        });
        if let Some(a) = artifact {
            m["artifactType"] = json!(a);
        }
        j(&m)
    };
    let cases = [
        (
            "garbage pack and index under another artifactType",
            manifest(
                Some("application/x-other"),
                vec![desc(TESSERA_INDEX, &index), desc(TESSERA_PACK, &pack)],
            ),
            "tessera index",
        ),
        (
            "pack layer without an index layer",
            manifest(Some("application/x-other"), vec![desc(TESSERA_PACK, &pack)]),
            TESSERA_INDEX,
        ),
        (
            "pack layer without an index layer, no artifactType",
            manifest(None, vec![desc(TESSERA_PACK, &pack)]),
            TESSERA_INDEX,
        ),
        (
            "tessera artifactType without an index layer",
            manifest(Some(TESSERA_IMAGE), vec![]),
            TESSERA_INDEX,
        ),
    ];
    for (what, m, says) in cases {
        let r = s.put_manifest("r", "t", OCI_MANIFEST, &m);
        assert_error_says(r, 400, &["MANIFEST_INVALID"], says);
        assert_eq!(s.get_manifest("r", &sha(&m)).status(), 404, "{what}");
    }
}

/// A descriptor whose size is not the stored blob's size is refused.
#[test]
fn descriptor_sizes_must_match_the_blobs() {
    let s = TesseraServe::start();
    let good = image_manifest(&s, "r", 930);
    let mut m = good.clone();
    let n = m["layers"][0]["size"].as_u64().unwrap();
    m["layers"][0]["size"] = json!(n + 1);
    let v = assert_error(
        s.put_manifest("r", "t", OCI_MANIFEST, &j(&m)),
        400,
        &["MANIFEST_INVALID"],
    );
    assert_eq!(v["errors"][0]["detail"]["size"], json!(n + 1), "{v}");
    assert_eq!(v["errors"][0]["detail"]["stored"], json!(n), "{v}");
    let mut m = good.clone();
    let n = m["config"]["size"].as_u64().unwrap();
    m["config"]["size"] = json!(n - 1);
    assert_error(
        s.put_manifest("r", "t", OCI_MANIFEST, &j(&m)),
        400,
        &["MANIFEST_INVALID"],
    );
    assert_error(s.get_manifest("r", "t"), 404, &["MANIFEST_UNKNOWN"]);
    s.push_manifest("r", "t", OCI_MANIFEST, &j(&good));
}

/// A manifest PUT needs a Content-Type unless the body's mediaType names its type.
#[test]
fn manifest_put_without_content_type() {
    let s = TesseraServe::start();
    let mut m = image_manifest(&s, "r", 940);
    m.as_object_mut().unwrap().remove("mediaType");
    let put = |body: Vec<u8>| {
        s.client
            .put(s.url("/v2/r/manifests/t"))
            .body(body)
            .send()
            .unwrap()
    };
    assert_error_says(
        put(j(&m)),
        400,
        &["MANIFEST_INVALID"],
        "Content-Type header is required",
    );
    assert_error(s.get_manifest("r", "t"), 404, &["MANIFEST_UNKNOWN"]);
    // With the type in the body, the header is not needed.
    m["mediaType"] = json!(OCI_MANIFEST);
    expect_status(put(j(&m)), 201, "mediaType in the body");
    let r = expect_status(s.get_manifest("r", "t"), 200, "GET");
    assert_eq!(header(&r, "content-type").as_deref(), Some(OCI_MANIFEST));
}

/// Errors outside the Distribution routes are OCI JSON errors too.
#[test]
fn every_error_body_is_an_oci_json_error() {
    let s = TesseraServe::start();
    // 16 MiB is the chunk query's limit; axum answered 413 in plain text.
    let body = vec![b' '; (16 << 20) + 1];
    let (status, text) = raw_request_with_body(
        &s.addr,
        "POST",
        "/tessera/v1/chunks",
        "application/json",
        &body,
    );
    assert_eq!(status, 413, "{text}");
    let json_part = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let v: Value = serde_json::from_str(json_part)
        .unwrap_or_else(|e| panic!("413 body is not JSON ({e}): {text}"));
    assert_eq!(v["errors"][0]["code"], "SIZE_INVALID", "{v}");
    assert!(v["errors"][0]["message"].is_string(), "{v}");
    // Wrong methods on the fixed endpoints.
    assert_error(s.get("/tessera/v1/chunks"), 405, &["UNSUPPORTED"]);
    let r = s.client.post(s.url("/metrics")).send().unwrap();
    assert_error(r, 405, &["UNSUPPORTED"]);
}

/// /metrics needs an account when auth is on, unless --metrics-public.
#[test]
fn metrics_follow_auth_unless_public() {
    let (_d, htpasswd) = write_htpasswd();
    let pw = htpasswd.to_str().unwrap();
    let s = TesseraServe::start_args(&["--htpasswd", pw]);
    assert_challenge(s.get("/metrics"), "anonymous /metrics");
    let r = s
        .client
        .get(s.url("/metrics"))
        .basic_auth("alice", Some("wrong"))
        .send()
        .unwrap();
    assert_challenge(r, "wrong password");
    let r = s
        .client
        .get(s.url("/metrics"))
        .basic_auth("alice", Some("s3cret"))
        .send()
        .unwrap();
    let text = body_text(expect_status(r, 200, "alice /metrics"));
    assert!(text.contains("tessera_registry_"), "{text}");
    let s = TesseraServe::start_args(&["--htpasswd", pw, "--metrics-public"]);
    let text = body_text(expect_status(s.get("/metrics"), 200, "public /metrics"));
    assert!(text.contains("tessera_registry_"), "{text}");
    // Without auth, /metrics stays open.
    let s = TesseraServe::start();
    expect_status(s.get("/metrics"), 200, "no auth");
}
