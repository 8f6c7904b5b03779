//! Registry authentication: `WWW-Authenticate` challenges, credentials (explicit, from
//! docker's `config.json`, or from its credential helpers) and a cache of bearer tokens
//! by scope. One implementation for every client in tessera: the converter, the mount,
//! the registry's pull-through proxy and the benchmarks.

use base64::Engine as _;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The docker config key of Docker Hub (what `docker login` writes).
pub const DOCKER_HUB_CONFIG_KEY: &str = "https://index.docker.io/v1/";

/// How long a credential helper may take before it is killed.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// A user name and secret for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "Credentials({}, ***)", self.username)
    }
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }

    /// `USER:PASSWORD` (the password may contain ':').
    pub fn parse(s: &str) -> Option<Credentials> {
        let (u, p) = s.split_once(':')?;
        Some(Credentials::new(u, p))
    }

    /// The value of an `Authorization: Basic` header.
    pub fn basic_header(&self) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", self.username, self.password))
        )
    }
}

/// One authentication challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `Bearer`, `Basic`, ... as sent (compare case-insensitively).
    pub scheme: String,
    /// Parameter names lowercased, values unquoted.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// Parse `Scheme k="v", k2=v2`. Quoted values may contain commas and `\"` escapes.
    /// Returns None for an empty header or a malformed parameter list.
    pub fn parse(header: &str) -> Option<Challenge> {
        let h = header.trim();
        if h.is_empty() {
            return None;
        }
        let (scheme, rest) = h.split_once(char::is_whitespace).unwrap_or((h, ""));
        let mut params = Vec::new();
        let mut s = rest.trim_start();
        while !s.is_empty() {
            let (k, after) = s.split_once('=')?;
            let k = k.trim().to_ascii_lowercase();
            if k.is_empty() || k.contains(|c: char| c.is_whitespace() || c == ',') {
                return None;
            }
            let after = after.trim_start();
            let (v, next) = if let Some(q) = after.strip_prefix('"') {
                let mut v = String::new();
                let mut chars = q.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, e)) = chars.next() {
                                v.push(e);
                            }
                        }
                        '"' => {
                            end = Some(i);
                            break;
                        }
                        c => v.push(c),
                    }
                }
                let end = end?;
                (v, &q[end + 1..])
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim().to_string(), &after[end..])
            };
            params.push((k, v));
            s = next.trim_start();
            s = s.strip_prefix(',').unwrap_or(s).trim_start();
        }
        Some(Challenge {
            scheme: scheme.to_string(),
            params,
        })
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_bearer(&self) -> bool {
        self.scheme.eq_ignore_ascii_case("bearer")
    }

    pub fn is_basic(&self) -> bool {
        self.scheme.eq_ignore_ascii_case("basic")
    }
}

/// Where credentials come from, resolved per registry host.
#[derive(Debug, Clone, Default)]
pub struct CredentialSource {
    /// Used for every host (`--creds USER:PASS`); overrides the docker config.
    pub explicit: Option<Credentials>,
    /// A docker `config.json` or the directory holding it (default: `$DOCKER_CONFIG`,
    /// then `~/.docker`).
    pub docker_config: Option<PathBuf>,
}

/// A credential helper or docker config that could not be used. Lookups log these and
/// go on anonymously: a broken helper must not make public images unreachable.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("docker config {path}: {why}")]
    Config { path: String, why: String },
    #[error("credential helper docker-credential-{helper}: {why} (is it installed and on PATH?)")]
    Helper { helper: String, why: String },
}

/// The docker config keys that may name `host`, most specific first.
fn config_keys(host: &str) -> Vec<String> {
    if is_docker_hub(host) {
        return vec![
            DOCKER_HUB_CONFIG_KEY.to_string(),
            "index.docker.io".into(),
            "docker.io".into(),
            "registry-1.docker.io".into(),
        ];
    }
    vec![host.to_string()]
}

/// Whether `host` is Docker Hub under any of its names.
pub fn is_docker_hub(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com"
    )
}

/// `https://host/v2/` → `host`, as docker normalizes config keys.
fn normalize_key(k: &str) -> &str {
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    k.split('/').next().unwrap_or(k)
}

impl CredentialSource {
    fn config_path(&self) -> Option<PathBuf> {
        let p = match &self.docker_config {
            Some(p) => p.clone(),
            None => std::env::var_os("DOCKER_CONFIG")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?,
        };
        Some(if p.is_dir() { p.join("config.json") } else { p })
    }

    /// Credentials for `host`, or None for anonymous access. Order: explicit, the
    /// host's `credHelpers` entry, `credsStore`, then `auths`.
    pub fn lookup(&self, host: &str) -> Result<Option<Credentials>, CredentialError> {
        if let Some(c) = &self.explicit {
            return Ok(Some(c.clone()));
        }
        let Some(path) = self.config_path() else {
            return Ok(None);
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(CredentialError::Config {
                    path: path.display().to_string(),
                    why: e.to_string(),
                })
            }
        };
        lookup_in_config(&bytes, host, &path, &run_helper)
    }
}

/// What a credential helper answers: credentials, none for this server, or a failure.
type HelperAnswer = Result<Option<Credentials>, CredentialError>;

/// `lookup` on the bytes of a config file, with `helper(name, server)` running helpers.
fn lookup_in_config(
    bytes: &[u8],
    host: &str,
    path: &Path,
    helper: &dyn Fn(&str, &str) -> HelperAnswer,
) -> Result<Option<Credentials>, CredentialError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| CredentialError::Config {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
    let keys = config_keys(host);
    if let Some(helpers) = v.get("credHelpers").and_then(|h| h.as_object()) {
        for (k, name) in helpers {
            if let Some(name) = name.as_str() {
                if keys
                    .iter()
                    .any(|key| normalize_key(key) == normalize_key(k))
                {
                    return helper(name, k);
                }
            }
        }
    }
    if let Some(store) = v.get("credsStore").and_then(|s| s.as_str()) {
        if !store.is_empty() {
            if let Some(c) = helper(store, &keys[0])? {
                return Ok(Some(c));
            }
        }
    }
    let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    for key in &keys {
        for (k, a) in auths {
            if normalize_key(k) != normalize_key(key) {
                continue;
            }
            if let (Some(u), Some(p)) = (
                a.get("username").and_then(|x| x.as_str()),
                a.get("password").and_then(|x| x.as_str()),
            ) {
                return Ok(Some(Credentials::new(u, p)));
            }
            let Some(enc) = a.get("auth").and_then(|x| x.as_str()) else {
                continue;
            };
            let bad = |why: &str| CredentialError::Config {
                path: path.display().to_string(),
                why: format!("auths.{k}.auth: {why}"),
            };
            let raw = base64::engine::general_purpose::STANDARD
                .decode(enc)
                .map_err(|_| bad("not base64"))?;
            let s = String::from_utf8(raw).map_err(|_| bad("not UTF-8"))?;
            return Credentials::parse(&s)
                .map(Some)
                .ok_or_else(|| bad("not USER:PASSWORD"));
        }
    }
    Ok(None)
}

/// Run `docker-credential-NAME get` with `server` on stdin (docker's helper protocol).
/// "credentials not found" is None; any other failure an error.
fn run_helper(name: &str, server: &str) -> HelperAnswer {
    if name.contains('/') || name.is_empty() {
        return Err(CredentialError::Helper {
            helper: name.to_string(),
            why: "invalid helper name".into(),
        });
    }
    run_helper_at(
        Path::new(&format!("docker-credential-{name}")),
        name,
        server,
    )
}

/// `run_helper` with the program named explicitly (found on PATH when it has no '/').
fn run_helper_at(program: &Path, name: &str, server: &str) -> HelperAnswer {
    let err = |why: String| CredentialError::Helper {
        helper: name.to_string(),
        why,
    };
    let mut child = Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading stdin is answered by its exit status.
        let _ = stdin.write_all(server.as_bytes());
    }
    let mut stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.take(1 << 20).read_to_end(&mut out);
        }
        out
    });
    let deadline = Instant::now() + HELPER_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(format!("no answer in {}s", HELPER_TIMEOUT.as_secs())));
            }
            Err(e) => return Err(err(e.to_string())),
        }
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        let text = String::from_utf8_lossy(&out);
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = (&mut e).take(4096).read_to_string(&mut stderr);
        }
        if text.contains("credentials not found") || stderr.contains("credentials not found") {
            return Ok(None);
        }
        return Err(err(format!("exited with {status}: {}", stderr.trim())));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out).map_err(|e| err(format!("answer is not JSON: {e}")))?;
    let user = v.get("Username").and_then(|x| x.as_str()).unwrap_or("");
    let secret = v
        .get("Secret")
        .and_then(|x| x.as_str())
        .ok_or_else(|| err("answer has no Secret".into()))?;
    Ok(Some(Credentials::new(user, secret)))
}

/// Bearer tokens by scope, each until shortly before it expires.
#[derive(Debug, Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

/// Seconds a token is used less than its lifetime, so it is not sent as it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(5);

impl TokenCache {
    pub fn get(&self, scope: &str) -> Option<String> {
        let map = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        map.get(scope)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(t, _)| t.clone())
    }

    /// Keep `token` for `lifetime` (the token server's `expires_in`; 60 s when absent,
    /// as the Docker token specification says).
    pub fn put(&self, scope: &str, token: &str, lifetime: Option<Duration>) {
        let life = lifetime
            .unwrap_or(Duration::from_secs(60))
            .max(Duration::from_secs(10));
        let until = Instant::now() + life - TOKEN_MARGIN;
        let mut map = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (_, u)| *u > Instant::now());
        map.insert(scope.to_string(), (token.to_string(), until));
    }

    pub fn forget(&self, scope: &str) {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(scope);
    }
}

/// The token and lifetime from a token server's JSON answer.
pub fn parse_token_answer(body: &[u8]) -> Option<(String, Option<Duration>)> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let token = v
        .get("token")
        .or_else(|| v.get("access_token"))
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())?;
    let life = v
        .get("expires_in")
        .and_then(|e| e.as_u64())
        .map(Duration::from_secs);
    Some((token.to_string(), life))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = Challenge::parse(r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#).unwrap();
        assert!(c.is_bearer());
        assert_eq!(c.param("realm"), Some("https://auth.example/token"));
        assert_eq!(c.param("scope"), Some("repository:a/b:pull,push"));
        let c = Challenge::parse(r#"Basic realm="x""#).unwrap();
        assert!(c.is_basic());
        assert_eq!(c.params.len(), 1);
        let c = Challenge::parse("Basic realm=x , Charset=UTF-8").unwrap();
        assert_eq!(c.param("realm"), Some("x"));
        assert_eq!(c.param("charset"), Some("UTF-8"));
        let c = Challenge::parse(r#"Bearer realm="a\"b",error="insufficient_scope""#).unwrap();
        assert_eq!(c.param("realm"), Some("a\"b"));
        assert_eq!(c.param("error"), Some("insufficient_scope"));
        assert!(Challenge::parse("").is_none());
        assert!(Challenge::parse(r#"Bearer realm="unterminated"#).is_none());
        assert!(Challenge::parse("Bearer novalue").is_none());
    }

    #[test]
    fn docker_config_auths() {
        let auth = base64::engine::general_purpose::STANDARD.encode("me:sec:ret");
        let cfg = format!(
            r#"{{"auths":{{"https://reg.example:5000/v2/":{{"auth":"{auth}"}},"https://index.docker.io/v1/":{{"username":"hub","password":"pw"}}}}}}"#
        );
        let no_helper = |_: &str, _: &str| -> Result<Option<Credentials>, CredentialError> {
            panic!("no helper is configured")
        };
        let p = Path::new("config.json");
        assert_eq!(
            lookup_in_config(cfg.as_bytes(), "reg.example:5000", p, &no_helper).unwrap(),
            Some(Credentials::new("me", "sec:ret"))
        );
        assert_eq!(
            lookup_in_config(cfg.as_bytes(), "registry-1.docker.io", p, &no_helper).unwrap(),
            Some(Credentials::new("hub", "pw"))
        );
        assert_eq!(
            lookup_in_config(cfg.as_bytes(), "other:1", p, &no_helper).unwrap(),
            None
        );
        assert!(lookup_in_config(b"{not json", "x", p, &no_helper).is_err());
        let bad = r#"{"auths":{"x":{"auth":"!!"}}}"#;
        assert!(lookup_in_config(bad.as_bytes(), "x", p, &no_helper).is_err());
    }

    #[test]
    fn helpers_come_before_auths() {
        let cfg = r#"{"credHelpers":{"reg.example":"pass"},"credsStore":"desktop",
                      "auths":{"reg.example":{"username":"plain","password":"x"},
                               "other.example":{"username":"o","password":"y"}}}"#;
        let asked = Mutex::new(Vec::new());
        let helper = |name: &str, server: &str| -> Result<Option<Credentials>, CredentialError> {
            asked.lock().unwrap().push(format!("{name} {server}"));
            Ok(match name {
                "pass" => Some(Credentials::new("from-pass", "s")),
                _ => None,
            })
        };
        let p = Path::new("config.json");
        assert_eq!(
            lookup_in_config(cfg.as_bytes(), "reg.example", p, &helper).unwrap(),
            Some(Credentials::new("from-pass", "s"))
        );
        // credsStore knows nothing of other.example: auths answer.
        assert_eq!(
            lookup_in_config(cfg.as_bytes(), "other.example", p, &helper).unwrap(),
            Some(Credentials::new("o", "y"))
        );
        assert_eq!(
            *asked.lock().unwrap(),
            vec!["pass reg.example", "desktop other.example"]
        );
    }

    #[test]
    fn real_helper_protocol() {
        // A helper on PATH speaking docker's protocol: server URL on stdin, JSON out.
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("docker-credential-tesseratest");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread server\n[ \"$1\" = get ] || exit 2\ncase \"$server\" in\n  known.example) printf '{\"ServerURL\":\"%s\",\"Username\":\"u\",\"Secret\":\"s3\"}' \"$server\";;\n  *) echo 'credentials not found in native keychain'; exit 1;;\nesac\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = br#"{"credsStore":"tesseratest"}"#;
        let run = |name: &str, server: &str| {
            run_helper_at(
                &dir.path().join(format!("docker-credential-{name}")),
                name,
                server,
            )
        };
        let p = Path::new("config.json");
        assert_eq!(
            lookup_in_config(cfg, "known.example", p, &run).unwrap(),
            Some(Credentials::new("u", "s3"))
        );
        assert_eq!(
            lookup_in_config(cfg, "unknown.example", p, &run).unwrap(),
            None
        );
        let missing = run_helper("tessera-no-such-helper", "x").unwrap_err();
        assert!(missing
            .to_string()
            .contains("docker-credential-tessera-no-such-helper"));
    }

    #[test]
    fn tokens_expire() {
        let c = TokenCache::default();
        c.put("repository:a:pull", "t1", Some(Duration::from_secs(300)));
        assert_eq!(c.get("repository:a:pull").as_deref(), Some("t1"));
        assert_eq!(c.get("repository:b:pull"), None);
        c.forget("repository:a:pull");
        assert_eq!(c.get("repository:a:pull"), None);
        assert_eq!(
            parse_token_answer(br#"{"access_token":"x","expires_in":120}"#),
            Some(("x".into(), Some(Duration::from_secs(120))))
        );
        assert_eq!(parse_token_answer(br#"{"token":""}"#), None);
        assert_eq!(parse_token_answer(b"nope"), None);
    }
}
