//! containerd's filter syntax for `Walk` (the snapshots `List` call), over snapshot
//! fields `name`, `parent`, `kind` and `labels.KEY`.
//!
//! A filter is selectors joined by `,` (all must hold); a list of filters matches when
//! any filter does. A selector is a field path with an optional operator and value:
//! `labels."containerd.io/gc.root"` (present), `parent=="default/3/sha256:…"`,
//! `kind!=active`, `name~=^tessera/`. Field path parts and values may be double-quoted
//! (Go escapes); unquoted values run to the next `,`.

use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter {filter:?}: {why} (containerd syntax: FIELD[==|!=|~=VALUE][,…], e.g. labels.\"containerd.io/snapshot.ref\"==sha256:…)")]
pub struct FilterError {
    pub filter: String,
    pub why: String,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Matches(regex_lite::Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// Parsed filters: matches when any of them does (no filters: everything).
#[derive(Debug, Clone, Default)]
pub struct Filters(Vec<Vec<Selector>>);

/// What a filter is matched against.
pub struct Fields<'a> {
    pub name: &'a str,
    pub parent: &'a str,
    pub kind: &'a str,
    pub labels: &'a HashMap<String, String>,
}

impl Filters {
    pub fn parse(filters: &[String]) -> Result<Filters, FilterError> {
        let mut out = Vec::new();
        for f in filters {
            if f.trim().is_empty() {
                continue;
            }
            out.push(parse_one(f).map_err(|why| FilterError {
                filter: f.clone(),
                why,
            })?);
        }
        Ok(Filters(out))
    }

    pub fn matches(&self, f: &Fields) -> bool {
        self.0.is_empty() || self.0.iter().any(|all| all.iter().all(|s| s.matches(f)))
    }
}

impl Selector {
    fn matches(&self, f: &Fields) -> bool {
        let value: Option<&str> = match self.path.first().map(String::as_str) {
            Some("name") if self.path.len() == 1 => Some(f.name),
            Some("parent") if self.path.len() == 1 => Some(f.parent),
            Some("kind") if self.path.len() == 1 => Some(f.kind),
            Some("labels") if self.path.len() >= 2 => {
                f.labels.get(&self.path[1..].join(".")).map(String::as_str)
            }
            _ => None,
        };
        match (&self.op, value) {
            (Op::Present, v) => v.is_some_and(|v| !v.is_empty()),
            (Op::Eq(want), Some(v)) => v == want,
            (Op::Eq(_), None) => false,
            (Op::Ne(want), Some(v)) => v != want,
            (Op::Ne(_), None) => true,
            (Op::Matches(re), Some(v)) => re.is_match(v),
            (Op::Matches(_), None) => false,
        }
    }
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Lexer<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c == b' ' || c == b'\t') {
            self.i += 1;
        }
    }
    fn starts(&self, p: &str) -> bool {
        self.s[self.i..].starts_with(p.as_bytes())
    }
    /// A double-quoted string with Go escapes (`\"`, `\\`, `\n`, `\t`, `\/`).
    fn quoted(&mut self) -> Result<String, String> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err("unterminated quoted string".into()),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    let c = self.s.get(self.i + 1).copied();
                    out.push(match c {
                        Some(b'n') => b'\n',
                        Some(b't') => b'\t',
                        Some(c @ (b'"' | b'\\' | b'/')) => c,
                        _ => return Err("unknown escape in quoted string".into()),
                    });
                    self.i += 2;
                }
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| "quoted string is not UTF-8".into())
    }
    fn field(&mut self) -> Result<String, String> {
        if self.peek() == Some(b'"') {
            return self.quoted();
        }
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        {
            self.i += 1;
        }
        if self.i == start {
            return Err(format!("expected a field name at byte {start}"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn value(&mut self) -> Result<String, String> {
        self.skip_ws();
        if self.peek() == Some(b'"') {
            return self.quoted();
        }
        let start = self.i;
        while self.peek().is_some_and(|c| c != b',') {
            self.i += 1;
        }
        let v = String::from_utf8_lossy(&self.s[start..self.i])
            .trim()
            .to_string();
        if v.is_empty() {
            return Err(format!("expected a value at byte {start}"));
        }
        Ok(v)
    }
}

fn parse_one(f: &str) -> Result<Vec<Selector>, String> {
    let mut lx = Lexer {
        s: f.as_bytes(),
        i: 0,
    };
    let mut sels = Vec::new();
    loop {
        lx.skip_ws();
        let mut path = vec![lx.field()?];
        while lx.peek() == Some(b'.') {
            lx.i += 1;
            path.push(lx.field()?);
        }
        lx.skip_ws();
        let op = if lx.starts("==") {
            lx.i += 2;
            Op::Eq(lx.value()?)
        } else if lx.starts("!=") {
            lx.i += 2;
            Op::Ne(lx.value()?)
        } else if lx.starts("~=") {
            lx.i += 2;
            let v = lx.value()?;
            Op::Matches(regex_lite::Regex::new(&v).map_err(|e| format!("bad pattern {v:?}: {e}"))?)
        } else {
            Op::Present
        };
        sels.push(Selector { path, op });
        lx.skip_ws();
        match lx.peek() {
            None => return Ok(sels),
            Some(b',') => lx.i += 1,
            Some(c) => return Err(format!("unexpected {:?} at byte {}", c as char, lx.i)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(labels: &'a HashMap<String, String>) -> Fields<'a> {
        Fields {
            name: "default/4/sha256:abc",
            parent: "default/3/sha256:def",
            kind: "committed",
            labels,
        }
    }

    #[test]
    fn containerds_own_target_lookup_parses_and_matches() {
        let mut labels = HashMap::new();
        labels.insert("containerd.io/snapshot.ref".into(), "sha256:abc".into());
        let l = fields(&labels);
        let f = Filters::parse(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/3/sha256:def""#
                .into(),
        ])
        .unwrap();
        assert!(f.matches(&l));
        let f = Filters::parse(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="other""#.into(),
        ])
        .unwrap();
        assert!(!f.matches(&l));
    }

    #[test]
    fn presence_inequality_patterns_and_or() {
        let mut labels = HashMap::new();
        labels.insert("containerd.io/gc.root".into(), "x".into());
        let l = fields(&labels);
        let ok = |s: &[&str]| {
            Filters::parse(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
                .matches(&l)
        };
        assert!(ok(&[r#"labels."containerd.io/gc.root""#]));
        assert!(!ok(&["labels.absent"]));
        assert!(ok(&["kind!=active"]));
        assert!(!ok(&["kind==active"]));
        assert!(ok(&["kind==active", "name~=^default/"]));
        assert!(!ok(&["name~=^tessera/"]));
        assert!(ok(&[]));
        assert!(ok(&["kind==committed , name~=sha256"]));
    }

    #[test]
    fn garbage_is_refused_with_the_syntax() {
        for bad in ["==x", "labels.\"open", "name==", "name~=(", "kind==\"x\" y"] {
            let e = Filters::parse(&[bad.to_string()]);
            assert!(e.is_err(), "{bad} parsed");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in ".{0,64}") {
            let _ = Filters::parse(&[s]);
        }
    }
}
