//! The bearer-token issuer of the Docker token protocol, so that every client — Docker
//! Engine included, which gives up on a `Basic` challenge when it has no credentials —
//! can pull anonymously what anonymous may pull, and log in with htpasswd users.
//!
//! * `GET /token?service=S&scope=repository:NAME:pull,push[&scope=...]`, with optional
//!   Basic credentials, answers `{"token","access_token","expires_in","issued_at"}`. The
//!   token grants, for each requested repository, the requested actions that the access
//!   rules allow the caller (anonymous without credentials); an action not allowed is
//!   left out rather than refused, as the protocol says. Bad credentials are 401.
//! * `POST /token` takes the OAuth2 password grant (`grant_type=password&username=..&
//!   password=..&scope=..`) that some clients use for `login`.
//! * Tokens are `base64url(claims JSON) "." base64url(HMAC-SHA256(key, first part))`,
//!   valid for `token_ttl_secs` (300 s by default). The key is 32 random bytes in
//!   `ROOT/token.key` (mode 0600), created on first start; replicas that share the root
//!   share it. A token is checked for its signature, its expiry and its service, and
//!   then grants exactly what it lists.

use crate::auth::{Auth, Identity};
use crate::config::Action;
use base64::Engine as _;
use ring::hmac;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The `service` the registry names in its challenges and tokens.
pub const SERVICE: &str = "tessera";

/// Most scopes one token request may ask for.
const MAX_SCOPES: usize = 64;

/// What one token allows on one repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// `repository` (the only type granted; `registry:catalog:*` maps to the catalog).
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// The claims a token carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The account; empty for anonymous.
    pub sub: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    pub access: Vec<Grant>,
}

impl Claims {
    /// Whether the token allows `action` on `repo` (`None`: the base endpoint or the
    /// catalog, which any valid token may reach; the catalog filters by access itself).
    pub fn allows(&self, repo: Option<&str>, action: Action) -> bool {
        let Some(repo) = repo else {
            return true;
        };
        let want = action_name(action);
        self.access.iter().any(|g| {
            g.kind == "repository"
                && g.name == repo
                && g.actions.iter().any(|a| a == want || a == "*")
        })
    }

    pub fn identity(&self) -> Identity {
        if self.sub.is_empty() {
            Identity::Anonymous
        } else {
            Identity::User(self.sub.clone())
        }
    }
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Pull => "pull",
        Action::Push => "push",
        Action::Delete => "delete",
    }
}

fn parse_action(s: &str) -> Option<Action> {
    match s {
        "pull" => Some(Action::Pull),
        "push" => Some(Action::Push),
        "delete" => Some(Action::Delete),
        _ => None,
    }
}

/// Why a token or a token request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not verify")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token is for another service ({0})")]
    Audience(String),
    #[error("invalid scope {0:?}: expected repository:NAME:ACTIONS")]
    Scope(String),
    #[error("too many scopes in one request (at most {MAX_SCOPES})")]
    TooManyScopes,
}

/// A requested scope: repository name and actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub name: String,
    pub actions: Vec<String>,
}

/// Parse `repository:NAME:a,b` scopes (one per value, or several separated by spaces).
/// Scopes of other resource types (`registry:catalog:*`) are skipped; a `repository`
/// scope with an invalid name is an error.
pub fn parse_scopes<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<Scope>, TokenError> {
    let mut out = Vec::new();
    for v in values {
        for s in v.split(' ').filter(|s| !s.is_empty()) {
            if out.len() >= MAX_SCOPES {
                return Err(TokenError::TooManyScopes);
            }
            let Some(rest) = s.strip_prefix("repository:") else {
                continue;
            };
            // The name may itself hold ':' only as `NAME:TAG`-free repository names do
            // not: split at the last ':'.
            let (name, actions) = rest
                .rsplit_once(':')
                .ok_or_else(|| TokenError::Scope(s.to_string()))?;
            if !tessera_oci::reference::valid_repo(name) {
                return Err(TokenError::Scope(s.to_string()));
            }
            let actions: Vec<String> = actions
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect();
            out.push(Scope {
                name: name.to_string(),
                actions,
            });
        }
    }
    Ok(out)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Issues and checks tokens.
pub struct TokenIssuer {
    key: hmac::Key,
    ttl: Duration,
}

/// A token and what the JSON answer says about it.
#[derive(Debug, Clone, Serialize)]
pub struct Issued {
    pub token: String,
    pub access_token: String,
    pub expires_in: u64,
    pub issued_at: String,
}

impl TokenIssuer {
    /// The issuer whose key is `ROOT/token.key`, created (0600, 32 random bytes) when
    /// missing. A key file of another size is refused rather than replaced.
    pub fn load_or_create(root: &Path, ttl: Duration) -> std::io::Result<TokenIssuer> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = root.join("token.key");
        let key = match std::fs::read(&path) {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut k = [0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k)
                    .map_err(|_| std::io::Error::other("no system randomness for the token key"))?;
                // Written under a temporary name and linked into place, so that two
                // replicas starting at once agree on one key.
                let tmp = root.join(format!("token.key.{}", std::process::id()));
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(&k)?;
                f.sync_all()?;
                let linked = std::fs::hard_link(&tmp, &path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => k.to_vec(),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        std::fs::read(&path)?
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        if key.len() != 32 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} holds {} bytes, not 32: remove it to make a new key (tokens issued with it stop working)",
                    path.display(),
                    key.len()
                ),
            ));
        }
        Ok(TokenIssuer::with_key(&key, ttl))
    }

    pub fn with_key(key: &[u8], ttl: Duration) -> TokenIssuer {
        TokenIssuer {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            ttl: ttl.max(Duration::from_secs(10)),
        }
    }

    fn b64() -> base64::engine::GeneralPurpose {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
    }

    /// A token for `who` with the grants the rules allow among `scopes`.
    pub fn issue(&self, auth: &Auth, who: &Identity, scopes: &[Scope]) -> Issued {
        let mut access: Vec<Grant> = Vec::new();
        for s in scopes {
            let allowed: Vec<String> = s
                .actions
                .iter()
                .filter_map(|a| parse_action(a).map(|p| (a, p)))
                .filter(|(_, p)| auth.allowed(who, Some(&s.name), *p))
                .map(|(a, _)| a.clone())
                .collect();
            match access.iter_mut().find(|g| g.name == s.name) {
                Some(g) => {
                    for a in allowed {
                        if !g.actions.contains(&a) {
                            g.actions.push(a);
                        }
                    }
                }
                None => access.push(Grant {
                    kind: "repository".into(),
                    name: s.name.clone(),
                    actions: allowed,
                }),
            }
        }
        let iat = now_secs();
        let claims = Claims {
            sub: match who {
                Identity::User(u) => u.clone(),
                Identity::Anonymous => String::new(),
            },
            aud: SERVICE.into(),
            iat,
            exp: iat + self.ttl.as_secs(),
            access,
        };
        let token = self.sign(&claims);
        Issued {
            access_token: token.clone(),
            token,
            expires_in: self.ttl.as_secs(),
            issued_at: rfc3339(iat),
        }
    }

    fn sign(&self, claims: &Claims) -> String {
        // Serializing these plain fields cannot fail.
        let body = serde_json::to_vec(claims).unwrap_or_default();
        let first = Self::b64().encode(body);
        let tag = hmac::sign(&self.key, first.as_bytes());
        format!("{first}.{}", Self::b64().encode(tag.as_ref()))
    }

    /// The claims of a token this registry issued and that is still valid.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let (first, sig) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let sig = Self::b64().decode(sig).map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.key, first.as_bytes(), &sig).map_err(|_| TokenError::Signature)?;
        let body = Self::b64()
            .decode(first)
            .map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&body).map_err(|_| TokenError::Malformed)?;
        if claims.aud != SERVICE {
            return Err(TokenError::Audience(claims.aud));
        }
        if claims.exp <= now_secs() {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (UTC).
fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The `WWW-Authenticate` value that sends a client to the token endpoint.
pub fn challenge(realm: &str, scope: Option<&str>) -> String {
    match scope {
        Some(s) => format!(r#"Bearer realm="{realm}",service="{SERVICE}",scope="{s}""#),
        None => format!(r#"Bearer realm="{realm}",service="{SERVICE}""#),
    }
}

/// The scope a request to `repo` with `action` needs, for the challenge.
pub fn scope_for(repo: &str, action: Action) -> String {
    match action {
        Action::Pull => format!("repository:{repo}:pull"),
        Action::Push => format!("repository:{repo}:pull,push"),
        Action::Delete => format!("repository:{repo}:delete"),
    }
}

/// The form fields of an OAuth2 token request (`POST /token`).
#[derive(Debug, Default, Deserialize)]
pub struct OAuthForm {
    pub grant_type: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub scope: Option<String>,
    pub service: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AccessRule;

    fn auth(dir: &Path) -> Auth {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let p = dir.join("htpasswd");
        std::fs::write(&p, format!("alice:{hash}\n")).unwrap();
        Auth::load(
            &p,
            vec![
                AccessRule {
                    account: "anonymous".into(),
                    repository: "public/*".into(),
                    actions: vec![Action::Pull],
                },
                AccessRule {
                    account: "alice".into(),
                    repository: "*".into(),
                    actions: vec![Action::Pull, Action::Push],
                },
            ],
        )
        .unwrap()
    }

    #[test]
    fn grants_are_what_the_rules_allow() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path());
        let t = TokenIssuer::with_key(&[7u8; 32], Duration::from_secs(300));
        let scopes =
            parse_scopes(["repository:public/app:pull,push repository:private/x:pull"]).unwrap();
        let anon = t.issue(&a, &Identity::Anonymous, &scopes);
        let c = t.verify(&anon.token).unwrap();
        assert_eq!(c.identity(), Identity::Anonymous);
        assert!(c.allows(Some("public/app"), Action::Pull));
        assert!(!c.allows(Some("public/app"), Action::Push));
        assert!(!c.allows(Some("private/x"), Action::Pull));
        assert!(
            !c.allows(Some("public/other"), Action::Pull),
            "only what was asked"
        );
        assert!(c.allows(None, Action::Pull));
        let alice = t.issue(&a, &Identity::User("alice".into()), &scopes);
        let c = t.verify(&alice.token).unwrap();
        assert!(c.allows(Some("public/app"), Action::Push));
        assert!(c.allows(Some("private/x"), Action::Pull));
        assert!(!c.allows(Some("private/x"), Action::Delete));
        assert_eq!(alice.expires_in, 300);
    }

    #[test]
    fn forged_expired_and_foreign_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path());
        let t = TokenIssuer::with_key(&[7u8; 32], Duration::from_secs(300));
        let scopes = parse_scopes(["repository:public/app:pull"]).unwrap();
        let tok = t.issue(&a, &Identity::Anonymous, &scopes).token;
        // Another key.
        let other = TokenIssuer::with_key(&[8u8; 32], Duration::from_secs(300));
        assert_eq!(other.verify(&tok), Err(TokenError::Signature));
        // Claims changed after signing: grant push.
        let (first, sig) = tok.split_once('.').unwrap();
        let mut c: Claims =
            serde_json::from_slice(&TokenIssuer::b64().decode(first).unwrap()).unwrap();
        c.access[0].actions.push("push".into());
        let forged = format!(
            "{}.{sig}",
            TokenIssuer::b64().encode(serde_json::to_vec(&c).unwrap())
        );
        assert_eq!(t.verify(&forged), Err(TokenError::Signature));
        // Expired, properly signed.
        c.exp = now_secs() - 1;
        assert_eq!(t.verify(&t.sign(&c)), Err(TokenError::Expired));
        c.exp = now_secs() + 100;
        c.aud = "elsewhere".into();
        assert!(matches!(
            t.verify(&t.sign(&c)),
            Err(TokenError::Audience(_))
        ));
        for junk in ["", ".", "abc", "a.b", "!!!.???"] {
            assert!(t.verify(junk).is_err(), "{junk}");
        }
    }

    #[test]
    fn scopes() {
        let s = parse_scopes(["repository:a/b:pull,push", "registry:catalog:*"]).unwrap();
        assert_eq!(
            s,
            vec![Scope {
                name: "a/b".into(),
                actions: vec!["pull".into(), "push".into()]
            }]
        );
        assert!(parse_scopes(["repository:UPPER:pull"]).is_err());
        assert!(parse_scopes(["repository:nocolon"]).is_err());
        let many = vec!["repository:a:pull"; MAX_SCOPES + 1];
        assert_eq!(parse_scopes(many), Err(TokenError::TooManyScopes));
    }

    #[test]
    fn key_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path());
        let t1 = TokenIssuer::load_or_create(dir.path(), Duration::from_secs(60)).unwrap();
        let tok = t1.issue(&a, &Identity::Anonymous, &[]).token;
        let t2 = TokenIssuer::load_or_create(dir.path(), Duration::from_secs(60)).unwrap();
        assert!(
            t2.verify(&tok).is_ok(),
            "a restarted registry accepts its tokens"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("token.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join("token.key"), b"short").unwrap();
        assert!(TokenIssuer::load_or_create(dir.path(), Duration::from_secs(60)).is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_256_000), "2026-12-03T00:00:00Z");
    }
}
