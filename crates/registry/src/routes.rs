//! Routing of `/v2/...` paths: repository names may contain `/` and even `blobs` or
//! `manifests` segments, so paths are parsed from the end.

use crate::config::Action;
use axum::http::Method;

/// What a `/v2/` path names.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Base,
    Catalog,
    Blob(String, String),
    Manifest(String, String),
    Tags(String),
    Referrers(String, String),
    UploadStart(String),
    Upload(String, String),
}

impl Route {
    pub fn repo(&self) -> Option<&str> {
        match self {
            Route::Base | Route::Catalog => None,
            Route::Blob(r, _)
            | Route::Manifest(r, _)
            | Route::Tags(r)
            | Route::Referrers(r, _)
            | Route::UploadStart(r)
            | Route::Upload(r, _) => Some(r),
        }
    }

    /// The same route in pull-through repository `ns/REPO` (for `?ns=` requests).
    pub fn under_namespace(self, ns: &str) -> Route {
        let put = |r: String| {
            if r.starts_with(&format!("{ns}/")) {
                r
            } else {
                format!("{ns}/{r}")
            }
        };
        match self {
            Route::Base | Route::Catalog => self,
            Route::Blob(r, d) => Route::Blob(put(r), d),
            Route::Manifest(r, m) => Route::Manifest(put(r), m),
            Route::Tags(r) => Route::Tags(put(r)),
            Route::Referrers(r, d) => Route::Referrers(put(r), d),
            Route::UploadStart(r) => Route::UploadStart(put(r)),
            Route::Upload(r, id) => Route::Upload(put(r), id),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Blob(..) => "blob",
            Route::Manifest(..) => "manifest",
            Route::Tags(_) => "tags",
            Route::Referrers(..) => "referrers",
            Route::UploadStart(_) | Route::Upload(..) => "upload",
        }
    }
}

/// Parse a path below `/v2/`, from the end.
pub fn parse_route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Route::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    if let Some(repo) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags(repo.to_string()));
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    if n >= 4 && segs[n - 3] == "blobs" && segs[n - 2] == "uploads" {
        let repo = segs[..n - 3].join("/");
        return Some(if segs[n - 1].is_empty() {
            Route::UploadStart(repo)
        } else {
            Route::Upload(repo, segs[n - 1].to_string())
        });
    }
    if n >= 3 {
        let repo = segs[..n - 2].join("/");
        let last = segs[n - 1].to_string();
        return match segs[n - 2] {
            "blobs" => Some(Route::Blob(repo, last)),
            "manifests" => Some(Route::Manifest(repo, last)),
            "referrers" => Some(Route::Referrers(repo, last)),
            _ => None,
        };
    }
    None
}

pub fn required_action(route: &Route, method: &Method) -> Action {
    match (route, method) {
        (Route::Catalog, _) | (_, &Method::GET) | (_, &Method::HEAD) => Action::Pull,
        // Cancelling one's own upload is part of pushing.
        (Route::Upload(..), &Method::DELETE) => Action::Push,
        (_, &Method::DELETE) => Action::Delete,
        _ => Action::Push,
    }
}

pub(crate) fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    q.map(|q| {
        q.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                let dec = |s: &str| {
                    percent_encoding::percent_decode_str(&s.replace('+', " "))
                        .decode_utf8_lossy()
                        .into_owned()
                };
                (dec(k), dec(v))
            })
            .collect()
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_from_the_end() {
        let r = |p: &str| parse_route(p);
        assert_eq!(r("/v2/"), Some(Route::Base));
        assert_eq!(r("/v2"), Some(Route::Base));
        assert_eq!(r("/v2/_catalog"), Some(Route::Catalog));
        assert_eq!(r("/v2/a/b/tags/list"), Some(Route::Tags("a/b".into())));
        assert_eq!(
            r("/v2/x/blobs/manifests/y/manifests/latest"),
            Some(Route::Manifest(
                "x/blobs/manifests/y".into(),
                "latest".into()
            ))
        );
        assert_eq!(
            r("/v2/a/blobs/sha256:ab"),
            Some(Route::Blob("a".into(), "sha256:ab".into()))
        );
        assert_eq!(
            r("/v2/a/blobs/uploads/"),
            Some(Route::UploadStart("a".into()))
        );
        assert_eq!(
            r("/v2/a/b/blobs/uploads/123"),
            Some(Route::Upload("a/b".into(), "123".into()))
        );
        assert_eq!(
            r("/v2/a/referrers/sha256:ab"),
            Some(Route::Referrers("a".into(), "sha256:ab".into()))
        );
        assert_eq!(r("/v2/a/other/x"), None);
        assert_eq!(r("/v3/a/blobs/x"), None);
    }
}
