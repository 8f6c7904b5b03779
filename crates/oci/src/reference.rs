//! Image references: `HOST[:PORT]/REPO[:TAG|@DIGEST]`, `oci:DIR[:TAG]`, `docker-archive:FILE`.

use crate::OciError;
use std::path::PathBuf;

/// Where an image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// A registry repository; `reference` is a tag or a digest (None = `latest`).
    Registry {
        host: String,
        repo: String,
        reference: Option<String>,
        plain_http: bool,
    },
    /// An OCI image layout directory with an optional tag (`org.opencontainers.image.ref.name`).
    Layout { dir: PathBuf, tag: Option<String> },
    /// A `docker save` tarball.
    DockerArchive { file: PathBuf },
}

/// Whether a registry host is on loopback (plain HTTP is then used automatically).
pub fn is_loopback_host(host: &str) -> bool {
    let h = match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost" || h.starts_with("127.") || h == "::1"
}

/// Docker Hub's name in references (`docker.io/library/debian`).
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's Distribution API.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";

/// A repository name as the distribution spec defines it:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, at most 255
/// bytes. The one grammar of names in tessera: references, the registry's routes and
/// the proxy all use it.
pub fn valid_repo(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    name.split('/').all(valid_component)
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // a separator run: ".", "_", "__" or "-+"
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.' || x == b'-')
}

/// Whether the first component of a reference names a registry host rather than a
/// repository (docker's rule: it has a '.' or a ':', or is `localhost`).
fn is_host_component(c: &str) -> bool {
    c.contains('.') || c.contains(':') || c == "localhost"
}

impl ImageRef {
    /// Parse a reference. `plain_http` forces HTTP for non-loopback registries.
    pub fn parse(s: &str, plain_http: bool) -> Result<ImageRef, OciError> {
        let err = |why: &str| OciError::Reference(s.to_string(), why.to_string());
        if let Some(rest) = s.strip_prefix("oci:") {
            if rest.is_empty() {
                return Err(err("expected oci:DIR[:TAG]"));
            }
            if let Some((dir, d)) = rest.rsplit_once('@') {
                d.parse::<tessera_format::Digest>()
                    .map_err(|e| err(&e.to_string()))?;
                return Ok(ImageRef::Layout {
                    dir: PathBuf::from(dir),
                    tag: Some(d.to_string()),
                });
            }
            // The tag is after the last ':' unless that part looks like a path.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, Some(t.to_string())),
                _ => (rest, None),
            };
            if let Some(t) = &tag {
                if !valid_tag(t) {
                    return Err(err("invalid tag"));
                }
            }
            return Ok(ImageRef::Layout {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            if rest.is_empty() {
                return Err(err("expected docker-archive:FILE"));
            }
            return Ok(ImageRef::DockerArchive {
                file: PathBuf::from(rest),
            });
        }
        // As docker and containerd do: no host means Docker Hub, and a one-component
        // repository there is under `library/`.
        let (host, path) = match s.split_once('/') {
            Some((h, p)) if is_host_component(h) => (h, p.to_string()),
            _ => (DOCKER_HUB, s.to_string()),
        };
        if host.is_empty() || path.is_empty() {
            return Err(err(
                "expected [HOST[:PORT]/]REPO[:TAG|@DIGEST], oci:DIR[:TAG] or docker-archive:FILE",
            ));
        }
        let host = match host {
            "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB,
            h => h,
        };
        let path = if host == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let path = path.as_str();
        let (repo, reference) = if let Some((r, d)) = path.split_once('@') {
            d.parse::<tessera_format::Digest>()
                .map_err(|e| err(&e.to_string()))?;
            // A tag before the digest is ignored, as docker does.
            let r = r.rsplit_once(':').map(|(r, _)| r).unwrap_or(r);
            (r, Some(d.to_string()))
        } else {
            match path.rsplit_once(':') {
                Some((r, t)) => {
                    if !valid_tag(t) {
                        return Err(err("invalid tag"));
                    }
                    (r, Some(t.to_string()))
                }
                None => (path, None),
            }
        };
        if !valid_repo(repo) {
            return Err(err(
                "invalid repository name (lowercase letters, digits and . _ - separated by /)",
            ));
        }
        Ok(ImageRef::Registry {
            host: host.to_string(),
            repo: repo.to_string(),
            reference,
            plain_http: plain_http || is_loopback_host(host),
        })
    }
}

impl ImageRef {
    /// The host that serves a registry reference's API (Docker Hub's names map to
    /// `registry-1.docker.io`); None for layouts and archives.
    pub fn api_host(&self) -> Option<&str> {
        match self {
            ImageRef::Registry { host, .. } if host == DOCKER_HUB => Some(DOCKER_HUB_API_HOST),
            ImageRef::Registry { host, .. } => Some(host),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Registry {
                host,
                repo,
                reference,
                ..
            } => match reference {
                Some(r) if r.contains(':') => write!(f, "{host}/{repo}@{r}"),
                Some(r) => write!(f, "{host}/{repo}:{r}"),
                None => write!(f, "{host}/{repo}"),
            },
            ImageRef::Layout { dir, tag: Some(t) } if t.contains(':') => {
                write!(f, "oci:{}@{t}", dir.display())
            }
            ImageRef::Layout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            ImageRef::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            ImageRef::DockerArchive { file } => write!(f, "docker-archive:{}", file.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_forms() {
        let r = ImageRef::parse("localhost:5000/a/b:v1", false).unwrap();
        assert_eq!(
            r,
            ImageRef::Registry {
                host: "localhost:5000".into(),
                repo: "a/b".into(),
                reference: Some("v1".into()),
                plain_http: true
            }
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("registry.example.com/x@{d}"), false).unwrap();
        assert_eq!(
            r,
            ImageRef::Registry {
                host: "registry.example.com".into(),
                repo: "x".into(),
                reference: Some(d),
                plain_http: false
            }
        );
        assert!(matches!(
            ImageRef::parse("10.1.2.3:5000/x", true).unwrap(),
            ImageRef::Registry {
                plain_http: true,
                ..
            }
        ));
        assert!(matches!(
            ImageRef::parse("127.0.0.1:5000/x", false).unwrap(),
            ImageRef::Registry {
                plain_http: true,
                reference: None,
                ..
            }
        ));
        assert_eq!(
            ImageRef::parse("oci:/tmp/l:latest", false).unwrap(),
            ImageRef::Layout {
                dir: "/tmp/l".into(),
                tag: Some("latest".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci:/tmp/l", false).unwrap(),
            ImageRef::Layout {
                dir: "/tmp/l".into(),
                tag: None
            }
        );
        assert_eq!(
            ImageRef::parse("docker-archive:/x.tar", false).unwrap(),
            ImageRef::DockerArchive {
                file: "/x.tar".into()
            }
        );
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "Ubuntu",
            "localhost:5000/UPPER",
            "localhost:5000/",
            "localhost:5000/a//b",
            "localhost:5000/a:bad tag",
            "oci:",
            "localhost:5000/a@sha256:xyz",
            "docker-archive:",
        ] {
            assert!(ImageRef::parse(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn docker_hub_names() {
        for (input, repo, reference) in [
            ("ubuntu", "library/ubuntu", None),
            ("ubuntu:22.04", "library/ubuntu", Some("22.04")),
            ("docker.io/ubuntu", "library/ubuntu", None),
            (
                "index.docker.io/library/ubuntu:x",
                "library/ubuntu",
                Some("x"),
            ),
            ("someone/app:1", "someone/app", Some("1")),
            ("registry-1.docker.io/someone/app", "someone/app", None),
        ] {
            let r = ImageRef::parse(input, false).unwrap();
            assert_eq!(
                r,
                ImageRef::Registry {
                    host: DOCKER_HUB.into(),
                    repo: repo.into(),
                    reference: reference.map(str::to_string),
                    plain_http: false,
                },
                "{input}"
            );
            assert_eq!(r.api_host(), Some(DOCKER_HUB_API_HOST));
        }
        let r = ImageRef::parse("ubuntu:22.04", false).unwrap();
        assert_eq!(r.to_string(), "docker.io/library/ubuntu:22.04");
        // A host keeps a one-component repository as it is.
        let r = ImageRef::parse("localhost:5000/app", false).unwrap();
        assert_eq!(r.api_host(), Some("localhost:5000"));
        assert_eq!(r.to_string(), "localhost:5000/app");
    }

    #[test]
    fn names_and_tags() {
        for ok in [
            "a",
            "library/debian",
            "a/b/c",
            "x.y_z__w---v",
            "a/blobs/manifests/x",
        ] {
            assert!(valid_repo(ok), "{ok}");
        }
        for bad in [
            "", "A", "-a", "a-", "a//b", "a___b", "a..b", "/a", "a/", "a_.b", "é",
        ] {
            assert!(!valid_repo(bad), "{bad}");
        }
        assert!(!valid_repo(&"a".repeat(256)));
        assert!(valid_tag("latest"));
        assert!(valid_tag("_x.Y-1"));
        assert!(valid_tag(&"a".repeat(128)));
        assert!(!valid_tag(&"a".repeat(129)));
        assert!(!valid_tag(".a"));
        assert!(!valid_tag("-a"));
        assert!(!valid_tag(""));
        assert!(!valid_tag("a:b"));
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback_host("localhost:5000"));
        assert!(is_loopback_host("127.0.0.1"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("example.com:5000"));
    }
}
