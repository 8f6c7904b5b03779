//! htpasswd basic auth with per-repository rules.

use crate::config::{AccessRule, Action};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

pub struct Auth {
    users: HashMap<String, String>,
    rules: Vec<AccessRule>,
    /// Verified `Authorization` header values → user. bcrypt costs ~50 ms per check and
    /// clients send credentials on every request, so successes are remembered.
    verified: Mutex<HashMap<String, String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read htpasswd file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("htpasswd file {path} line {line}: {message}")]
    Parse {
        path: String,
        line: usize,
        message: String,
    },
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Anonymous,
    User(String),
}

pub enum Decision {
    Allow,
    /// No (valid) credentials: 401 with a challenge.
    Challenge,
    /// Valid credentials without the right: 403.
    Deny,
    /// A valid bearer token that does not grant this: 401 naming the scope needed, so
    /// the client can ask for a token that does (and gives up when it gets none).
    InsufficientScope,
}

impl Auth {
    pub fn load(path: &Path, rules: Vec<AccessRule>) -> Result<Auth, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line.split_once(':').ok_or_else(|| AuthError::Parse {
                path: path.display().to_string(),
                line: i + 1,
                message: "expected user:hash".into(),
            })?;
            if !hash.starts_with("$2") {
                return Err(AuthError::Parse {
                    path: path.display().to_string(),
                    line: i + 1,
                    message: "only bcrypt hashes are supported (htpasswd -B)".into(),
                });
            }
            users.insert(user.to_string(), hash.to_string());
        }
        Ok(Auth {
            users,
            rules,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Who the `Authorization` header says the caller is; `None` for bad credentials.
    pub fn identify(&self, header: Option<&str>) -> Option<Identity> {
        use base64::Engine as _;
        let Some(h) = header else {
            return Some(Identity::Anonymous);
        };
        if let Some(u) = self.cache().get(h) {
            return Some(Identity::User(u.clone()));
        }
        let b64 = h
            .strip_prefix("Basic ")
            .or_else(|| h.strip_prefix("basic "))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (user, pass) = raw.split_once(':')?;
        if user.is_empty() && pass.is_empty() {
            // `Basic Og==`: a client that has no credentials for us.
            return Some(Identity::Anonymous);
        }
        let hash = self.users.get(user)?;
        if !bcrypt::verify(pass, hash).unwrap_or(false) {
            return None;
        }
        let mut cache = self.cache();
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(h.to_string(), user.to_string());
        Some(Identity::User(user.to_string()))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn allowed(&self, who: &Identity, repo: Option<&str>, action: Action) -> bool {
        let authenticated = matches!(who, Identity::User(_));
        if self.rules.is_empty() {
            return authenticated;
        }
        self.rules.iter().any(|r| {
            let account_ok = match (r.account.as_str(), who) {
                ("anonymous", Identity::Anonymous) => true,
                ("*", Identity::User(_)) => true,
                (a, Identity::User(u)) => a == u,
                _ => false,
            };
            let repo_ok = match repo {
                // Base endpoint and catalog: any rule for this account will do.
                None => true,
                Some(name) => match r.repository.strip_suffix('*') {
                    Some(prefix) => name.starts_with(prefix),
                    None => r.repository == name,
                },
            };
            account_ok && repo_ok && r.actions.contains(&action)
        })
    }

    pub fn decide(&self, header: Option<&str>, repo: Option<&str>, action: Action) -> Decision {
        match self.identify(header) {
            None => Decision::Challenge,
            Some(who) if self.allowed(&who, repo, action) => Decision::Allow,
            Some(Identity::Anonymous) => Decision::Challenge,
            Some(Identity::User(_)) => Decision::Deny,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn basic(u: &str, p: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    }

    #[test]
    fn rules() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("htpasswd");
        let hash = bcrypt::hash("pw", 4).unwrap();
        std::fs::write(&f, format!("alice:{hash}\nbob:{hash}\n")).unwrap();
        let rules = vec![
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
        ];
        let a = Auth::load(&f, rules).unwrap();
        assert!(matches!(
            a.decide(None, Some("public/x"), Action::Pull),
            Decision::Allow
        ));
        assert!(matches!(
            a.decide(None, Some("private"), Action::Pull),
            Decision::Challenge
        ));
        let alice = basic("alice", "pw");
        assert!(matches!(
            a.decide(Some(&alice), Some("private"), Action::Push),
            Decision::Allow
        ));
        assert!(matches!(
            a.decide(Some(&alice), Some("private"), Action::Delete),
            Decision::Deny
        ));
        assert!(matches!(
            a.decide(Some(&basic("bob", "pw")), Some("private"), Action::Pull),
            Decision::Deny
        ));
        assert!(matches!(
            a.decide(Some(&basic("alice", "no")), Some("public/x"), Action::Pull),
            Decision::Challenge
        ));
        std::fs::write(&f, "carol:plain\n").unwrap();
        assert!(Auth::load(&f, vec![]).is_err());
    }
}
