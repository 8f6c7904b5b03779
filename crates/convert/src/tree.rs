//! The merged filesystem tree: layers applied in order with OCI whiteout semantics.

use crate::ConvertError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Bound;
use tessera_format::index::{show, Meta, TreeKind, TreeNode};

/// A path as components (no empty, `.` or `..` components).
pub type TreePath = Vec<Vec<u8>>;

/// One change a layer makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerOp {
    /// `.wh.NAME`: remove the path and everything below it from lower layers.
    Whiteout,
    /// `.wh..wh..opq` in a directory: remove the directory's children from lower layers.
    Opaque,
    /// Add or replace a node.
    Node(TreeNode),
    /// A hardlink to another path (in this layer or a lower one).
    HardLink(TreePath),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerEntry {
    pub path: TreePath,
    pub op: LayerOp,
}

/// The merged tree. BTreeMap order over component vectors is the index's canonical
/// depth-first order, and a path's descendants directly follow it.
#[derive(Debug, Default)]
pub struct MergedTree {
    pub map: BTreeMap<TreePath, TreeNode>,
    next_group: u64,
}

fn implicit_dir() -> TreeNode {
    TreeNode {
        meta: Meta {
            mode: 0o755,
            ..Meta::default()
        },
        kind: TreeKind::Dir,
        link_group: None,
    }
}

impl MergedTree {
    pub fn new() -> Self {
        let mut t = MergedTree {
            map: BTreeMap::new(),
            next_group: 1,
        };
        t.map.insert(Vec::new(), implicit_dir());
        t
    }

    fn descendants(&self, path: &TreePath) -> Vec<TreePath> {
        self.map
            .range::<TreePath, _>((Bound::Excluded(path), Bound::Unbounded))
            .take_while(|(k, _)| k.len() > path.len() && k.starts_with(path))
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn remove_subtree(&mut self, path: &TreePath) {
        for k in self.descendants(path) {
            self.map.remove(&k);
        }
        if !path.is_empty() {
            self.map.remove(path);
        }
    }

    fn ensure_parents(&mut self, path: &TreePath) -> Result<(), ConvertError> {
        for n in 1..path.len() {
            let anc = &path[..n];
            match self.map.get(anc) {
                Some(node) if matches!(node.kind, TreeKind::Dir) => {}
                Some(node) => {
                    let what = match node.kind {
                        TreeKind::Symlink(_) => {
                            "a symlink (writing through it could escape the rootfs)"
                        }
                        _ => "not a directory",
                    };
                    return Err(ConvertError::BadLayer(format!(
                        "{}: parent {} is {what}",
                        show(path),
                        show(anc)
                    )));
                }
                None => {
                    self.map.insert(anc.to_vec(), implicit_dir());
                }
            }
        }
        Ok(())
    }

    fn put(&mut self, path: &TreePath, node: TreeNode) -> Result<(), ConvertError> {
        if path.is_empty() {
            if !matches!(node.kind, TreeKind::Dir) {
                return Err(ConvertError::BadLayer(
                    "the root must be a directory".into(),
                ));
            }
            if let Some(root) = self.map.get_mut(path) {
                root.meta = node.meta;
            }
            return Ok(());
        }
        self.ensure_parents(path)?;
        if let Some(existing) = self.map.get_mut(path) {
            if matches!(existing.kind, TreeKind::Dir) && matches!(node.kind, TreeKind::Dir) {
                existing.meta = node.meta;
                return Ok(());
            }
            self.remove_subtree(path);
        }
        self.map.insert(path.clone(), node);
        Ok(())
    }

    /// Apply one layer: first its whiteouts (which only affect lower layers), then its
    /// nodes in archive order.
    pub fn apply(&mut self, layer: &[LayerEntry]) -> Result<(), ConvertError> {
        for e in layer {
            match e.op {
                LayerOp::Whiteout => self.remove_subtree(&e.path),
                LayerOp::Opaque => {
                    for k in self.descendants(&e.path) {
                        self.map.remove(&k);
                    }
                }
                _ => {}
            }
        }
        for e in layer {
            match &e.op {
                LayerOp::Node(n) => self.put(&e.path, n.clone())?,
                LayerOp::HardLink(target) => {
                    if target == &e.path {
                        continue;
                    }
                    let group = self.next_group;
                    let Some(t) = self.map.get_mut(target) else {
                        return Err(ConvertError::BadLayer(format!(
                            "{}: hardlink target {} does not exist",
                            show(&e.path),
                            show(target)
                        )));
                    };
                    if matches!(t.kind, TreeKind::Dir) {
                        return Err(ConvertError::BadLayer(format!(
                            "{}: hardlink to directory {}",
                            show(&e.path),
                            show(target)
                        )));
                    }
                    if t.link_group.is_none() {
                        t.link_group = Some(group);
                        self.next_group += 1;
                    }
                    let node = t.clone();
                    self.put(&e.path, node)?;
                }
                LayerOp::Whiteout | LayerOp::Opaque => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TreePath {
        s.split('/')
            .filter(|c| !c.is_empty())
            .map(|c| c.as_bytes().to_vec())
            .collect()
    }
    fn file(mode: u32) -> LayerOp {
        LayerOp::Node(TreeNode {
            meta: Meta {
                mode,
                ..Meta::default()
            },
            kind: TreeKind::File {
                size: 0,
                chunks: vec![],
            },
            link_group: None,
        })
    }
    fn dir() -> LayerOp {
        LayerOp::Node(TreeNode {
            meta: Meta {
                mode: 0o700,
                ..Meta::default()
            },
            kind: TreeKind::Dir,
            link_group: None,
        })
    }
    fn e(path: &str, op: LayerOp) -> LayerEntry {
        LayerEntry { path: p(path), op }
    }
    fn paths(t: &MergedTree) -> Vec<String> {
        t.map.keys().map(|k| show(k)).collect()
    }

    #[test]
    fn whiteouts_opaque_and_replacement() {
        let mut t = MergedTree::new();
        t.apply(&[
            e("a", dir()),
            e("a/x", file(0o644)),
            e("a/y", file(0o644)),
            e("b", dir()),
            e("b/z", file(0o644)),
            e("c", file(0o644)),
        ])
        .unwrap();
        // Layer 2: whiteout a/x, opaque b (but b/new from this layer stays), c becomes a dir.
        t.apply(&[
            e("a/x", LayerOp::Whiteout),
            e("b/new", file(0o600)),
            e("b", LayerOp::Opaque),
            e("c", dir()),
            e("c/d", file(0o644)),
        ])
        .unwrap();
        assert_eq!(paths(&t), vec!["/", "a", "a/y", "b", "b/new", "c", "c/d"]);
        // Layer 3: whiteout dir c then recreate it in the same layer.
        t.apply(&[
            e("c", LayerOp::Whiteout),
            e("c", dir()),
            e("c/e", file(0o644)),
        ])
        .unwrap();
        assert_eq!(paths(&t), vec!["/", "a", "a/y", "b", "b/new", "c", "c/e"]);
        // A directory replaced by a file drops its children.
        t.apply(&[e("c", file(0o600))]).unwrap();
        assert_eq!(paths(&t), vec!["/", "a", "a/y", "b", "b/new", "c"]);
    }

    #[test]
    fn hardlinks_across_layers_and_implicit_parents() {
        let mut t = MergedTree::new();
        t.apply(&[e("bin/tool", file(0o755))]).unwrap();
        assert_eq!(t.map[&p("bin")].meta.mode, 0o755, "implicit parent");
        t.apply(&[e("usr/bin/tool2", LayerOp::HardLink(p("bin/tool")))])
            .unwrap();
        let g1 = t.map[&p("bin/tool")].link_group;
        assert!(g1.is_some());
        assert_eq!(t.map[&p("usr/bin/tool2")].link_group, g1);
        assert!(t.apply(&[e("x", LayerOp::HardLink(p("missing")))]).is_err());
    }

    #[test]
    fn refuses_to_write_through_symlinks() {
        let mut t = MergedTree::new();
        let link = LayerOp::Node(TreeNode {
            meta: Meta::default(),
            kind: TreeKind::Symlink(b"/etc".to_vec()),
            link_group: None,
        });
        t.apply(&[e("l", link)]).unwrap();
        let err = t.apply(&[e("l/passwd", file(0o644))]).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
    }
}
