//! Printing the model the way torch prints an `nn.Module` tree (`print(model)`), so users can read
//! off the module names to target with LoRA.

/// One module in the printed tree.
#[derive(Debug, Clone, PartialEq)]
pub struct ReprNode {
    pub type_name: String,
    pub extra: String,
    pub children: Vec<(String, ReprNode)>,
    /// A `ModuleList`: children are indices and identical consecutive entries are folded.
    pub is_list: bool,
}

impl ReprNode {
    pub fn leaf(type_name: &str, extra: impl Into<String>) -> Self {
        Self {
            type_name: type_name.into(),
            extra: extra.into(),
            children: vec![],
            is_list: false,
        }
    }

    pub fn module(type_name: &str, children: Vec<(&str, ReprNode)>) -> Self {
        Self {
            type_name: type_name.into(),
            extra: String::new(),
            children: children.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            is_list: false,
        }
    }

    pub fn list(items: Vec<ReprNode>) -> Self {
        Self {
            type_name: "ModuleList".into(),
            extra: String::new(),
            children: items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v))
                .collect(),
            is_list: true,
        }
    }

    /// The text torch's `Module.__repr__` produces.
    pub fn render(&self) -> String {
        if self.is_list {
            return self.render_list();
        }
        let extra_lines: Vec<&str> = if self.extra.is_empty() {
            vec![]
        } else {
            self.extra.lines().collect()
        };
        let child_lines: Vec<String> = self
            .children
            .iter()
            .map(|(k, v)| format!("({k}): {}", add_indent(&v.render(), 2)))
            .collect();
        let mut out = format!("{}(", self.type_name);
        if extra_lines.len() == 1 && child_lines.is_empty() {
            out.push_str(extra_lines[0]);
        } else if !extra_lines.is_empty() || !child_lines.is_empty() {
            let lines: Vec<String> = extra_lines
                .iter()
                .map(|s| s.to_string())
                .chain(child_lines)
                .collect();
            out.push_str("\n  ");
            out.push_str(&lines.join("\n  "));
            out.push('\n');
        }
        out.push(')');
        out
    }

    fn render_list(&self) -> String {
        if self.children.is_empty() {
            return format!("{}()", self.type_name);
        }
        let reprs: Vec<String> = self.children.iter().map(|(_, v)| v.render()).collect();
        let mut blocks: Vec<(usize, usize, &String)> = vec![(0, 0, &reprs[0])];
        for (i, r) in reprs.iter().enumerate().skip(1) {
            let last = blocks.len() - 1;
            if r == blocks[last].2 {
                blocks[last].1 = i;
            } else {
                blocks.push((i, i, r));
            }
        }
        let lines: Vec<String> = blocks
            .iter()
            .map(|(s, e, b)| {
                let local = if s == e {
                    format!("({s}): {b}")
                } else {
                    format!("({s}-{e}): {} x {b}", e - s + 1)
                };
                add_indent(&local, 2)
            })
            .collect();
        format!("{}(\n  {}\n)", self.type_name, lines.join("\n  "))
    }
}

/// torch's `_addindent`: indents every line but the first.
fn add_indent(s: &str, n: usize) -> String {
    let mut lines = s.split('\n');
    let first = lines.next().unwrap_or_default().to_string();
    let pad = " ".repeat(n);
    let rest: Vec<String> = lines.map(|l| format!("{pad}{l}")).collect();
    if rest.is_empty() {
        first
    } else {
        format!("{first}\n{}", rest.join("\n"))
    }
}

/// Formats a float as Python's `repr(float)` does (`1e-05`, `0.1`, `0.0`).
pub fn py_float(x: f64) -> String {
    let s = format!("{x:?}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_python() {
        assert_eq!(py_float(1e-5), "1e-05");
        assert_eq!(py_float(1e-12), "1e-12");
        assert_eq!(py_float(0.0), "0.0");
        assert_eq!(py_float(0.1), "0.1");
    }

    #[test]
    fn lists_fold_repeats() {
        let l = ReprNode::list(vec![
            ReprNode::leaf("A", "x"),
            ReprNode::leaf("A", "x"),
            ReprNode::leaf("B", ""),
        ]);
        assert_eq!(l.render(), "ModuleList(\n  (0-1): 2 x A(x)\n  (2): B()\n)");
    }
}
