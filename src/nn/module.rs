//! The model tree: every module declares its children and its own parameters once ([`module!`]), and the
//! walks the rest of the crate needs are written once here, generically, as torch's `nn.Module` does them:
//! the parameter walk (`named_parameters()` order: a module's own parameters, then its children's), the
//! same walk able to replace tensors, the module paths (`named_modules()`), `print(model)`, and the layers
//! LoRA can adapt.

use tch::Tensor;

use super::layers::{Conv2d, Linear};
use super::params::join;
use crate::error::Result;
use crate::repr::ReprNode;

/// One node of the model tree.
pub trait Module {
    /// torch's class name, as `print(model)` shows it.
    fn type_name(&self) -> &str;

    /// Child modules in registration order (absent optional children left out).
    fn children(&self) -> Vec<(String, &dyn Module)> {
        Vec::new()
    }

    /// The same children, mutable.
    fn children_mut(&mut self) -> Vec<(String, &mut dyn Module)> {
        Vec::new()
    }

    /// This module's own parameters (not its children's) in registration order, by name relative to it.
    fn own_params(&self, _f: &mut dyn FnMut(&str, &Tensor)) {}

    /// The same parameters, replaceable.
    fn own_params_mut(&mut self, _f: &mut dyn FnMut(&str, &mut Tensor)) {}

    /// The settings `print(model)` shows on this module's line (torch's `extra_repr`).
    fn extra_repr(&self) -> String {
        String::new()
    }

    /// How `print(model)` shows this module: its class name, settings and children's lines (LoRA-wrapped
    /// layers show peft's wrapper instead).
    fn repr(&self) -> ReprNode {
        let children = self
            .children()
            .into_iter()
            .map(|(name, child)| (name, child.repr()))
            .collect();
        ReprNode {
            type_name: self.type_name().to_string(),
            extra: self.extra_repr(),
            children,
            is_list: false,
        }
    }

    /// The layer LoRA can adapt, when this module is one.
    fn adaptable(&mut self) -> Option<AdaptableLayer<'_>> {
        None
    }
}

/// A layer LoRA attaches to.
pub enum AdaptableLayer<'a> {
    Linear(&'a mut Linear),
    Conv2d(&'a mut Conv2d),
}

/// Visits every adaptable layer with its module path.
pub type LayerVisitor<'a> = dyn FnMut(&str, AdaptableLayer<'_>) -> Result<()> + 'a;

/// Every parameter under `module` with its full path (`prefix` is the module's own), in torch's
/// `named_parameters()` order. Tied parameters are visited once (by their owner).
pub fn visit_params(module: &dyn Module, prefix: &str, f: &mut dyn FnMut(&str, &Tensor)) {
    module.own_params(&mut |name, t| f(&join(prefix, name), t));
    for (name, child) in module.children() {
        visit_params(child, &join(prefix, &name), f);
    }
}

/// [`visit_params`] with each tensor replaceable (the same parameters, in the same order).
pub fn visit_params_mut(module: &mut dyn Module, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
    module.own_params_mut(&mut |name, t| f(&join(prefix, name), t));
    for (name, child) in module.children_mut() {
        visit_params_mut(child, &join(prefix, &name), f);
    }
}

/// Every layer LoRA can adapt under `module`, with its path, in `named_modules()` order.
pub fn visit_adaptable(module: &mut dyn Module, prefix: &str, f: &mut LayerVisitor) -> Result<()> {
    if let Some(layer) = module.adaptable() {
        return f(prefix, layer);
    }
    for (name, child) in module.children_mut() {
        visit_adaptable(child, &join(prefix, &name), f)?;
    }
    Ok(())
}

/// A list of modules (torch's `ModuleList`): children named by index.
impl<T: Module> Module for Vec<T> {
    fn type_name(&self) -> &str {
        "ModuleList"
    }

    fn children(&self) -> Vec<(String, &dyn Module)> {
        self.iter()
            .enumerate()
            .map(|(i, m)| (i.to_string(), m as &dyn Module))
            .collect()
    }

    fn children_mut(&mut self) -> Vec<(String, &mut dyn Module)> {
        self.iter_mut()
            .enumerate()
            .map(|(i, m)| (i.to_string(), m as &mut dyn Module))
            .collect()
    }

    fn repr(&self) -> ReprNode {
        ReprNode::list(self.iter().map(Module::repr).collect())
    }
}

/// Declares a module's place in the tree once: its torch class name, its own parameters and its children,
/// each as `"torch name" => field` in registration order (`?field` for an `Option` child that may be
/// absent), and optionally the method giving its `extra_repr`. Every walk of [`Module`] derives from this.
///
/// ```ignore
/// module!(BlipAttention: "BlipAttention" {
///     children: ["dropout" => dropout, "qkv" => qkv, "projection" => projection],
/// });
/// ```
#[macro_export]
macro_rules! module {
    ($ty:ty : $name:literal {
        $(params: [$($pname:literal => $pfield:ident),* $(,)?] $(,)?)?
        $(children: [$($cname:literal => $(? $ofield:ident)? $($cfield:ident)?),* $(,)?] $(,)?)?
        $(extra: $extra:ident $(,)?)?
    }) => {
        impl $crate::nn::Module for $ty {
            fn type_name(&self) -> &str {
                $name
            }
            $(fn extra_repr(&self) -> String {
                self.$extra()
            })?
            $crate::module!(@body $(params: [$($pname => $pfield),*],)? $(children: [$($cname => $(? $ofield)? $($cfield)?),*],)?);
        }
    };
    // The class name read from a field (one Rust type standing for several torch classes).
    ($ty:ty : self.$name_field:ident {
        $(params: [$($pname:literal => $pfield:ident),* $(,)?] $(,)?)?
        $(children: [$($cname:literal => $(? $ofield:ident)? $($cfield:ident)?),* $(,)?] $(,)?)?
    }) => {
        impl $crate::nn::Module for $ty {
            fn type_name(&self) -> &str {
                self.$name_field
            }
            $crate::module!(@body $(params: [$($pname => $pfield),*],)? $(children: [$($cname => $(? $ofield)? $($cfield)?),*],)?);
        }
    };
    (@body $(params: [$($pname:literal => $pfield:ident),*],)? $(children: [$($cname:literal => $(? $ofield:ident)? $($cfield:ident)?),*],)?) => {
        $(
            fn own_params(&self, f: &mut dyn FnMut(&str, &tch::Tensor)) {
                $(f($pname, &self.$pfield);)*
            }
            fn own_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut tch::Tensor)) {
                $(f($pname, &mut self.$pfield);)*
            }
        )?
        $(
            // Optional children make the pushes conditional, so the list is built by pushing.
            #[allow(clippy::vec_init_then_push)]
            fn children(&self) -> Vec<(String, &dyn $crate::nn::Module)> {
                #[allow(unused_mut)]
                let mut out: Vec<(String, &dyn $crate::nn::Module)> = Vec::new();
                $($crate::module!(@push out, $cname, self, $(? $ofield)? $($cfield)?);)*
                out
            }
            #[allow(clippy::vec_init_then_push)]
            fn children_mut(&mut self) -> Vec<(String, &mut dyn $crate::nn::Module)> {
                #[allow(unused_mut)]
                let mut out: Vec<(String, &mut dyn $crate::nn::Module)> = Vec::new();
                $($crate::module!(@push_mut out, $cname, self, $(? $ofield)? $($cfield)?);)*
                out
            }
        )?
    };
    (@push $out:ident, $cname:literal, $self:ident, ? $field:ident) => {
        if let Some(child) = &$self.$field {
            $out.push(($cname.to_string(), child));
        }
    };
    (@push $out:ident, $cname:literal, $self:ident, $field:ident) => {
        $out.push(($cname.to_string(), &$self.$field));
    };
    (@push_mut $out:ident, $cname:literal, $self:ident, ? $field:ident) => {
        if let Some(child) = &mut $self.$field {
            $out.push(($cname.to_string(), child));
        }
    };
    (@push_mut $out:ident, $cname:literal, $self:ident, $field:ident) => {
        $out.push(($cname.to_string(), &mut $self.$field));
    };
}
