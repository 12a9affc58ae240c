//! Whole modules trained in full next to adapters (peft's `modules_to_save`): each adapter owns a copy of
//! the module's tensors and the layers hold the copy in use. This is their state and how they show in
//! `named_parameters` (`<path>.original_module.<param>`, `<path>.modules_to_save.<adapter>.<param>`) and in
//! `print(model)` (peft's `ModulesToSaveWrapper`); `crate::lora::saved` makes, swaps and removes them.

use tch::Tensor;

use crate::repr::ReprNode;

/// One wrapped module.
#[derive(Debug)]
pub struct SavedModule {
    /// The module's path (`vision_model.post_layernorm`).
    pub path: String,
    /// Its parameters' names below `path`, in `named_parameters` order.
    pub names: Vec<String>,
    /// The frozen original parameters, in `names` order.
    pub original: Vec<Tensor>,
    /// Each adapter's trainable copy, in `names` order, in the order the adapters were added.
    pub copies: Vec<(String, Vec<Tensor>)>,
    /// The adapter whose copy is used (none: the original).
    pub active: Option<String>,
    /// Adapters bypassed (`disable_adapter`): the original is used.
    pub disabled: bool,
}

impl SavedModule {
    pub fn copy_of(&self, adapter: &str) -> Option<&Vec<Tensor>> {
        self.copies.iter().find(|(n, _)| n == adapter).map(|(_, t)| t)
    }

    /// The tensors the model's layers should hold now.
    pub fn in_use(&self) -> &Vec<Tensor> {
        match &self.active {
            Some(a) if !self.disabled => self.copy_of(a).unwrap_or(&self.original),
            _ => &self.original,
        }
    }
}

/// Whether `name` lies in the module at `path` (or is it).
pub fn is_under(name: &str, path: &str) -> bool {
    name == path || name.strip_prefix(path).is_some_and(|rest| rest.starts_with('.'))
}

/// Rewrites plain `named_parameters` for the wrapped modules: each module's parameters become its
/// original's, then every copy's, under peft's names.
pub fn rename(saved: &[SavedModule], plain: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    if saved.is_empty() {
        return plain;
    }
    let mut out = Vec::with_capacity(plain.len());
    let mut done: Vec<&str> = Vec::new();
    for (name, t) in plain {
        let Some(m) = saved.iter().find(|m| is_under(&name, &m.path)) else {
            out.push((name, t));
            continue;
        };
        if done.contains(&m.path.as_str()) {
            continue;
        }
        done.push(&m.path);
        for (n, o) in m.names.iter().zip(&m.original) {
            out.push((format!("{}.original_module.{n}", m.path), o.shallow_clone()));
        }
        for (adapter, copy) in &m.copies {
            for (n, c) in m.names.iter().zip(copy) {
                out.push((
                    format!("{}.modules_to_save.{adapter}.{n}", m.path),
                    c.shallow_clone(),
                ));
            }
        }
    }
    out
}

/// Shows each wrapped module as peft prints its `ModulesToSaveWrapper`.
pub fn wrap_repr(saved: &[SavedModule], root: &mut ReprNode) {
    fn find<'a>(node: &'a mut ReprNode, path: &str) -> Option<&'a mut ReprNode> {
        let (head, rest) = match path.split_once('.') {
            Some((h, r)) => (h, Some(r)),
            None => (path, None),
        };
        let child = node
            .children
            .iter_mut()
            .find(|(k, _)| k == head)
            .map(|(_, c)| c)?;
        match rest {
            Some(r) => find(child, r),
            None => Some(child),
        }
    }
    for m in saved {
        if let Some(node) = find(root, &m.path) {
            let original = node.clone();
            let copies = ReprNode::module(
                "ModuleDict",
                m.copies
                    .iter()
                    .map(|(a, _)| (a.as_str(), original.clone()))
                    .collect(),
            );
            *node = ReprNode::module(
                "ModulesToSaveWrapper",
                vec![("original_module", original), ("modules_to_save", copies)],
            );
        }
    }
}
