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

fn valid_repo(repo: &str) -> bool {
    // OCI distribution: path components of [a-z0-9]+ separated by . _ __ or -+
    !repo.is_empty()
        && repo.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        })
}

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && tag.as_bytes()[0] != b'.'
        && tag.as_bytes()[0] != b'-'
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
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
        let Some((host, path)) = s.split_once('/') else {
            return Err(err(
                "expected HOST[:PORT]/REPO[:TAG|@DIGEST], oci:DIR[:TAG] or docker-archive:FILE",
            ));
        };
        if host.is_empty() || !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(err(
                "the first component must be a registry host (e.g. localhost:5000/repo:tag)",
            ));
        }
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
            "ubuntu",
            "localhost:5000/UPPER",
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
    fn loopback_detection() {
        assert!(is_loopback_host("localhost:5000"));
        assert!(is_loopback_host("127.0.0.1"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("example.com:5000"));
    }
}
