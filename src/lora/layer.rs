//! The adapters attached to one Linear or Conv2d layer: peft's `LoraLayer` state and arithmetic.
//! `y = base(x) + B(A(dropout(x))) · s` per active adapter, with A/B kept in float32 whatever the
//! base precision (the input is cast to the adapter dtype, the sum cast back, as peft does).

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::nn::{AdapterRows, ForwardContext};
use crate::repr::{py_float, ReprNode};

/// One named adapter's weights.
#[derive(Debug)]
pub struct LoraAdapter {
    /// `[r, in]` for Linear, `[r, in, k, k]` for Conv2d.
    pub a: Tensor,
    /// `[out, r]` for Linear, `[out, r, 1, 1]` for Conv2d.
    pub b: Tensor,
    pub r: i64,
    pub alpha: f64,
    pub scaling: f64,
    pub dropout: f64,
    /// DoRA's per-output magnitude (`[out]` for Linear, `[1, out, 1, 1]` for Conv2d); None for plain LoRA.
    pub magnitude: Option<Tensor>,
    /// DoRA: the weight norm the merge divided by, so unmerging restores the base exactly.
    pub merged_norm: Option<Tensor>,
}

impl LoraAdapter {
    /// `ΔW = (B A) · s` in the adapter's precision, shaped like the base weight.
    pub fn delta_weight(&self, base_shape: &[i64]) -> Result<Tensor> {
        let b = self.b.f_flatten(1, -1)?;
        let a = self.a.f_flatten(1, -1)?;
        Ok(b.f_matmul(&a)?
            .f_reshape(base_shape)?
            .f_mul_scalar(self.scaling)?)
    }
}

/// What kind of layer the adapters sit on, with the geometry the low-rank branch needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseKind {
    Linear,
    Conv2d { kernel: i64, stride: i64 },
}

/// The adapters of one layer and which of them are active, merged or disabled.
#[derive(Debug)]
pub struct LoraSlot {
    pub adapters: Vec<(String, LoraAdapter)>,
    pub active: Vec<String>,
    /// Adapters whose delta is currently added into the base weight.
    pub merged: Vec<String>,
    /// All adapters bypassed (`with model.disable_adapter():`).
    pub disabled: bool,
    pub base: BaseKind,
}

impl LoraSlot {
    pub fn new(base: BaseKind) -> Self {
        Self {
            adapters: Vec::new(),
            active: Vec::new(),
            merged: Vec::new(),
            disabled: false,
            base,
        }
    }

    fn adapter_mut(&mut self, name: &str) -> Result<&mut LoraAdapter> {
        self.adapters
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
            .ok_or_else(|| Error::invalid(format!("no adapter named {name:?}")))
    }

    pub fn get(&self, name: &str) -> Option<&LoraAdapter> {
        self.adapters.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    /// `B(A(x))` for this layer's geometry.
    fn low_rank(&self, x: &Tensor, ad: &LoraAdapter) -> Result<Tensor> {
        Ok(match self.base {
            BaseKind::Linear => x
                .f_linear::<Tensor>(&ad.a, None)?
                .f_linear::<Tensor>(&ad.b, None)?,
            BaseKind::Conv2d { stride, .. } => x
                .f_conv2d::<Tensor>(&ad.a, None, [stride, stride], [0, 0], [1, 1], 1)?
                .f_conv2d::<Tensor>(&ad.b, None, [1, 1], [0, 0], [1, 1], 1)?,
        })
    }

    /// The base layer's operation without its bias.
    fn base_op(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        Ok(match self.base {
            BaseKind::Linear => x.f_linear::<Tensor>(weight, None)?,
            BaseKind::Conv2d { stride, .. } => {
                x.f_conv2d::<Tensor>(weight, None, [stride, stride], [0, 0], [1, 1], 1)?
            }
        })
    }

    fn broadcast_bias(&self, bias: &Tensor) -> Result<Tensor> {
        Ok(match self.base {
            BaseKind::Linear => bias.shallow_clone(),
            BaseKind::Conv2d { .. } => bias.f_view([1, -1, 1, 1])?,
        })
    }

    /// DoRA's `m / ‖W + s·BA‖` (the norm detached, as the paper and peft do), shaped to broadcast over the output.
    fn dora_scale(&self, ad: &LoraAdapter, magnitude: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let w = weight.f_to_kind(ad.a.kind())?;
        let delta = ad.delta_weight(&w.size())?.f_detach()?;
        let norm = weight_norm(&w.f_add(&delta)?, self.base)?.f_detach()?;
        let scale = magnitude.f_div(&norm)?;
        Ok(match self.base {
            BaseKind::Linear => scale.f_view([1, -1])?,
            BaseKind::Conv2d { .. } => scale,
        })
    }

    /// Adds the deltas of `names` (active adapters by default) into `weight`.
    pub fn merge(&mut self, weight: &Tensor, names: Option<&[String]>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let names: Vec<String> = names
            .map(<[String]>::to_vec)
            .unwrap_or_else(|| self.active.clone());
        for name in names {
            if self.merged.contains(&name) {
                continue;
            }
            let base = self.base;
            let ad = self.adapter_mut(&name)?;
            let delta = ad.delta_weight(&weight.size())?;
            check_finite(&delta, &name)?;
            let mut w = weight.shallow_clone();
            match &ad.magnitude {
                None => {
                    let _ = w.f_add_(&delta.f_to_kind(weight.kind())?)?;
                }
                Some(m) => {
                    // W' = m / ‖W + ΔW‖ · (W + ΔW), remembering the norm for an exact unmerge.
                    let combined = weight.f_to_kind(ad.a.kind())?.f_add(&delta)?;
                    let norm = weight_norm(&combined, base)?;
                    let factor = per_row(&m.f_div(&norm)?, base)?;
                    w.f_copy_(&combined.f_mul(&factor)?.f_to_kind(weight.kind())?)?;
                    ad.merged_norm = Some(norm);
                }
            }
            self.merged.push(name);
        }
        Ok(())
    }

    /// Subtracts every merged adapter's delta from `weight`.
    pub fn unmerge(&mut self, weight: &Tensor) -> Result<()> {
        let _guard = tch::no_grad_guard();
        while let Some(name) = self.merged.pop() {
            let base = self.base;
            let ad = self.adapter_mut(&name)?;
            let delta = ad.delta_weight(&weight.size())?;
            let mut w = weight.shallow_clone();
            match (&ad.magnitude, ad.merged_norm.take()) {
                (Some(m), Some(norm)) => {
                    let factor = per_row(&m.f_div(&norm)?, base)?;
                    let restored = weight.f_to_kind(ad.a.kind())?.f_div(&factor)?.f_sub(&delta)?;
                    w.f_copy_(&restored.f_to_kind(weight.kind())?)?;
                }
                _ => {
                    let _ = w.f_sub_(&delta.f_to_kind(weight.kind())?)?;
                }
            }
        }
        Ok(())
    }
}

/// DoRA's column-wise norm of a weight: per output row for Linear (`[out]`), and for Conv2d over all but
/// the output dimension, laid out `[1, out, 1, 1]` as peft stores it.
pub fn weight_norm(weight: &Tensor, base: BaseKind) -> Result<Tensor> {
    Ok(match base {
        BaseKind::Linear => weight.f_norm_scalaropt_dim(2.0, [1i64].as_slice(), false)?,
        BaseKind::Conv2d { .. } => weight
            .f_norm_scalaropt_dim(2.0, [1i64, 2, 3].as_slice(), true)?
            .f_transpose(1, 0)?,
    })
}

/// A per-output factor shaped to scale the rows of the base weight.
fn per_row(factor: &Tensor, base: BaseKind) -> Result<Tensor> {
    Ok(match base {
        BaseKind::Linear => factor.f_view([-1, 1])?,
        BaseKind::Conv2d { .. } => factor.f_view([-1, 1, 1, 1])?,
    })
}

fn check_finite(delta: &Tensor, name: &str) -> Result<()> {
    if !bool::try_from(delta.f_isfinite()?.f_all()?)? {
        return Err(Error::invalid(format!(
            "adapter {name:?} holds NaN or infinite values; merging it would break the model"
        )));
    }
    Ok(())
}

/// Kaiming-uniform with a = √5 (torch's default Linear/Conv init): U(-1/√fan_in, 1/√fan_in).
pub fn kaiming_uniform(shape: &[i64], device: tch::Device) -> Result<Tensor> {
    let fan_in: i64 = shape[1..].iter().product();
    let bound = 1.0 / (fan_in as f64).sqrt();
    Ok(Tensor::f_empty(shape, (Kind::Float, device))?.f_uniform_(-bound, bound)?)
}

impl LoraSlot {
    /// `result` (the base output for `x`) plus one adapter's contribution, in the adapter's kind (the caller
    /// casts back): `B(A(dropout(x))) · s`, or DoRA's rescaled form. `writable`: as [`Adapter::apply`]'s.
    /// `mixed_precision`: a training step computing in `result`'s (half) kind with float32 adapters, where
    /// the update joins `result`'s kind as under peft's `torch.autocast`.
    #[allow(clippy::too_many_arguments)]
    fn add_one(
        &self,
        x: &Tensor,
        result: Tensor,
        ad: &LoraAdapter,
        weight: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
        mixed_precision: bool,
        writable: bool,
    ) -> Result<Tensor> {
        let mut xa = x.f_to_kind(ad.a.kind())?;
        let dropped = train && ad.dropout > 0.0;
        if dropped {
            xa = crate::nn::dropout_mask::dropout(&xa, ad.dropout)?; // torch's distribution, cheaper masks
        }
        let same_kind = result.kind() == xa.kind();
        if ad.magnitude.is_none() && matches!(self.base, BaseKind::Linear) && (same_kind || mixed_precision) {
            // result + s·(x Aᵀ) Bᵀ as one GEMM accumulating into the base output, the scaling applied to the
            // rank-r intermediate: no passes over the [rows, out] output to scale and add (on the
            // cross-attention's image positions those passes cost more than the adapter's GEMMs). Under mixed
            // precision the rank-r intermediate and B are cast to the output's kind for that GEMM (autocast
            // runs peft's lora_B in bf16 too): a float32 update of the [rows, out] output costs four passes
            // over it forward and as many backward (a bf16 LoRA step at batch 8, 2-core AMD EPYC: 11.4 s with
            // them, 9.6 s without; bench/RESULTS.md).
            let mut h = xa.f_linear::<Tensor>(&ad.a, None)?.f_mul_scalar(ad.scaling)?;
            let mut b = ad.b.shallow_clone();
            if !same_kind {
                h = h.f_to_kind(result.kind())?;
                b = b.f_to_kind(result.kind())?;
            }
            let rank = h.size().last().copied().unwrap_or(0);
            let shape = result.size();
            if writable && shape.len() == 2 {
                // Into the base output itself (a reshape, even to its own shape, would make a view, and an
                // in-place update of a view costs autograd a copy in the backward).
                let mut result = result;
                let _ = result.f_addmm_(&h.f_reshape([-1, rank])?, &b.f_tr()?)?;
                return Ok(result);
            }
            let out = shape.last().copied().unwrap_or(0);
            return Ok(result
                .f_reshape([-1, out])?
                .f_addmm(&h.f_reshape([-1, rank])?, &b.f_tr()?)?
                .f_reshape(shape)?);
        }
        let low = self.low_rank(&xa, ad)?;
        // A float32 adapter on a half-precision base accumulates in float32, then casts back.
        Ok(match &ad.magnitude {
            None => result.f_add(&low.f_mul_scalar(ad.scaling)?)?,
            Some(m) => {
                // DoRA: rescale the base output and the low-rank update by m / ‖W + s·BA‖.
                let base_result = if dropped {
                    self.base_op(&xa, &weight.f_to_kind(ad.a.kind())?)?
                } else {
                    match bias {
                        Some(b) => result.f_sub(&self.broadcast_bias(b)?)?,
                        None => result.shallow_clone(),
                    }
                };
                let scale = self.dora_scale(ad, m, weight)?;
                let dora = scale
                    .f_sub_scalar(1.0)?
                    .f_mul(&base_result)?
                    .f_add(&scale.f_mul(&low)?.f_mul_scalar(ad.scaling)?)?;
                result.f_add(&dora)?
            }
        })
    }

    /// A mixed-adapter batch: row `i` of `x` gets the adapter `rows` names for it (the base model for
    /// `"__base__"`, and for an adapter this layer does not hold, as peft does). One adapter for every row is
    /// the plain path; otherwise a Linear computes the adapter branch of all rows at once by gathered batched
    /// matmuls (each row's A and B stacked, `bmm`, as Punica's BGMV), and a Conv2d (the patch embedding, once
    /// per image) by one gathered sub-batch per adapter. Inference only (no dropout).
    fn apply_mixed(
        &self,
        x: &Tensor,
        result: Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        rows: &AdapterRows,
    ) -> Result<Tensor> {
        if !self.merged.is_empty() {
            return Err(Error::invalid(
                "cannot pass adapter_names while adapters are merged into the base weights; call \
                 unmerge_adapter() first",
            ));
        }
        let n = x.size()[0];
        if rows.len() as i64 != n {
            return Err(Error::invalid(format!(
                "adapter_names has {} names but the batch has {n} rows; give one name per row",
                rows.len()
            )));
        }
        // This layer's adapter for each name (peft: a name the layer lacks runs the base there).
        let here: Vec<Option<&LoraAdapter>> = rows.names().iter().map(|name| self.get(name)).collect();
        let row_group: Vec<Option<usize>> = rows
            .rows()
            .iter()
            .map(|g| g.filter(|&g| here[g].is_some()))
            .collect();
        let with: Vec<i64> = (0..n).filter(|&r| row_group[r as usize].is_some()).collect();
        let Some(first) = with.first().map(|&r| row_group[r as usize]) else {
            return Ok(result);
        };
        let out_kind = result.kind();
        let uniform = with.len() as i64 == n && row_group.iter().all(|&g| g == first);
        let mixed = if uniform {
            let ad = here[first.expect("a row with an adapter")].expect("held here");
            self.add_one(x, result, ad, weight, bias, false, false, false)?
        } else {
            match self.base {
                BaseKind::Linear => {
                    self.gathered_linear(x, result, weight, bias, &here, &row_group, &with)?
                }
                BaseKind::Conv2d { .. } => self.grouped(x, result, weight, bias, &here, &row_group)?,
            }
        };
        Ok(if mixed.kind() != out_kind {
            mixed.f_to_kind(out_kind)?
        } else {
            mixed
        })
    }

    /// The adapter branch of the rows `with` of a Linear's input, each row with its own adapter
    /// (`here[row_group[r]]`), as two gathered batched matmuls: the rows' A (`[rows, r_max, in]`, smaller ranks
    /// zero-padded) and B (`[rows, out, r_max]`) are stacked and `x·Aᵀ·Bᵀ` runs as one `bmm` each; the
    /// per-row scaling and DoRA's per-row rescaling are broadcast. Rows without an adapter keep `result`.
    #[allow(clippy::too_many_arguments)]
    fn gathered_linear(
        &self,
        x: &Tensor,
        result: Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        here: &[Option<&LoraAdapter>],
        row_group: &[Option<usize>],
        with: &[i64],
    ) -> Result<Tensor> {
        let size = result.size();
        let n = size[0];
        let (in_f, out_f) = (
            *x.size().last().expect("features"),
            *size.last().expect("features"),
        );
        let device = x.device();
        let akind = here.iter().flatten().next().expect("an adapter").a.kind();
        let x3 = x.f_reshape([n, -1, in_f])?;
        let res3 = result.f_reshape([n, -1, out_f])?;
        let sub = if (with.len() as i64) < n {
            Some(Tensor::f_from_slice(with)?.f_to_device(device)?)
        } else {
            None
        };
        let (xs, res) = match &sub {
            Some(idx) => (x3.f_index_select(0, idx)?, res3.f_index_select(0, idx)?),
            None => (x3.shallow_clone(), res3.shallow_clone()),
        };
        let xs = xs.f_to_kind(akind)?;
        let r_max = here.iter().flatten().map(|ad| ad.r).max().expect("an adapter");
        // Each adapter's A and B padded to r_max once; the rows then stack shallow copies of them.
        let padded: Vec<Option<(Tensor, Tensor)>> = here
            .iter()
            .map(|ad| {
                ad.map(|ad| -> Result<(Tensor, Tensor)> {
                    let pad = r_max - ad.r;
                    Ok(if pad == 0 {
                        (ad.a.shallow_clone(), ad.b.shallow_clone())
                    } else {
                        (
                            ad.a.f_constant_pad_nd([0, 0, 0, pad])?,
                            ad.b.f_constant_pad_nd([0, pad])?,
                        )
                    })
                })
                .transpose()
            })
            .collect::<Result<_>>()?;
        let groups: Vec<usize> = with
            .iter()
            .map(|&r| row_group[r as usize].expect("a row with an adapter"))
            .collect();
        let pick = |g: usize| padded[g].as_ref().expect("held here");
        let a_rows: Vec<&Tensor> = groups.iter().map(|&g| &pick(g).0).collect();
        let b_rows: Vec<&Tensor> = groups.iter().map(|&g| &pick(g).1).collect();
        let a = Tensor::f_stack(&a_rows, 0)?; // [rows, r_max, in]
        let b = Tensor::f_stack(&b_rows, 0)?; // [rows, out, r_max]
        let low = xs.f_bmm(&a.f_transpose(1, 2)?)?.f_bmm(&b.f_transpose(1, 2)?)?; // [rows, T, out]
        let scalings: Vec<f64> = groups
            .iter()
            .map(|&g| here[g].expect("held here").scaling)
            .collect();
        let s = Tensor::f_from_slice(&scalings)?
            .f_to_kind(akind)?
            .f_to_device(device)?
            .f_view([-1, 1, 1])?;
        let dora = groups
            .iter()
            .any(|&g| here[g].is_some_and(|ad| ad.magnitude.is_some()));
        let updated = if dora {
            // Per row m / ‖W + s·BA‖ (ones for plain LoRA rows, where the formula reduces to LoRA's exactly).
            let ones = Tensor::f_ones([1, out_f], (akind, device))?;
            let scales: Vec<Option<Tensor>> = here
                .iter()
                .map(|ad| match ad {
                    Some(ad) => match &ad.magnitude {
                        Some(m) => self.dora_scale(ad, m, weight).map(Some),
                        None => Ok(Some(ones.shallow_clone())),
                    },
                    None => Ok(None),
                })
                .collect::<Result<_>>()?;
            let scale_rows: Vec<&Tensor> = groups
                .iter()
                .map(|&g| scales[g].as_ref().expect("held here"))
                .collect();
            let scale = Tensor::f_stack(&scale_rows, 0)?; // [rows, 1, out]
            let base = match bias {
                Some(b) => res.f_sub(b)?,
                None => res.shallow_clone(),
            };
            let dora = scale
                .f_sub_scalar(1.0)?
                .f_mul(&base)?
                .f_add(&scale.f_mul(&low)?.f_mul(&s)?)?;
            res.f_add(&dora)?
        } else {
            res.f_add(&low.f_mul(&s)?)?
        };
        let updated = updated.f_to_kind(result.kind())?;
        let out = match &sub {
            Some(idx) => res3.f_index_copy(0, idx, &updated)?,
            None => updated,
        };
        Ok(out.f_reshape(size.as_slice())?)
    }

    /// The adapter branch as one gathered sub-batch per adapter (rows `index_select`ed, the plain path, written
    /// back with `index_copy`): for Conv2d, whose low-rank branch is two convolutions.
    fn grouped(
        &self,
        x: &Tensor,
        result: Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        here: &[Option<&LoraAdapter>],
        row_group: &[Option<usize>],
    ) -> Result<Tensor> {
        let device = x.device();
        let mut out = result;
        for (g, ad) in here.iter().enumerate() {
            let Some(ad) = ad else { continue };
            let idx: Vec<i64> = (0..row_group.len() as i64)
                .filter(|&r| row_group[r as usize] == Some(g))
                .collect();
            if idx.is_empty() {
                continue;
            }
            let idx = Tensor::f_from_slice(&idx)?.f_to_device(device)?;
            let rows = self.add_one(
                &x.f_index_select(0, &idx)?,
                out.f_index_select(0, &idx)?,
                ad,
                weight,
                bias,
                false,
                false,
                false,
            )?;
            out = out.f_index_copy(0, &idx, &rows.f_to_kind(out.kind())?)?;
        }
        Ok(out)
    }
}

impl crate::nn::Adapter for LoraSlot {
    /// Adds the contribution of every active, unmerged adapter to `result`, the base layer's output for
    /// `x` (whose weights are `weight` and `bias`); in a mixed-adapter batch, each row's own adapter.
    fn apply(
        &self,
        x: &Tensor,
        result: Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        cx: &ForwardContext,
        writable: bool,
    ) -> Result<Tensor> {
        if self.disabled {
            return Ok(result);
        }
        if let Some(rows) = cx.adapters {
            return self.apply_mixed(x, result, weight, bias, rows);
        }
        let out_kind = result.kind();
        let mixed_precision = cx.train && cx.compute_kind == Some(out_kind);
        let mut result = result;
        let mut touched = false;
        for name in &self.active {
            if self.merged.contains(name) {
                continue;
            }
            let Some(ad) = self.get(name) else { continue };
            // Each step returns a fresh tensor or `result` itself, so `writable` holds for the next adapter too.
            result = self.add_one(x, result, ad, weight, bias, cx.train, mixed_precision, writable)?;
            touched = true;
        }
        if touched && result.kind() != out_kind {
            result = result.f_to_kind(out_kind)?;
        }
        Ok(result)
    }

    /// Parameters with peft's names relative to the layer (`lora_A.<adapter>.weight`, ...), in peft's order.
    /// The adapters' parameters by peft's names relative to the layer (`lora_A.<name>.weight`, ...).
    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor)) {
        for (name, ad) in &self.adapters {
            f(&format!("lora_A.{name}.weight"), &ad.a);
        }
        for (name, ad) in &self.adapters {
            f(&format!("lora_B.{name}.weight"), &ad.b);
        }
        for (name, ad) in &self.adapters {
            if let Some(m) = &ad.magnitude {
                f(&format!("lora_magnitude_vector.{name}.weight"), m);
            }
        }
    }

    /// [`Self::visit`] with each tensor replaceable.
    fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        for (name, ad) in &mut self.adapters {
            f(&format!("lora_A.{name}.weight"), &mut ad.a);
        }
        for (name, ad) in &mut self.adapters {
            f(&format!("lora_B.{name}.weight"), &mut ad.b);
        }
        for (name, ad) in &mut self.adapters {
            if let Some(m) = &mut ad.magnitude {
                f(&format!("lora_magnitude_vector.{name}.weight"), m);
            }
        }
    }

    /// peft's printout of a LoRA layer around `base`.
    fn repr(&self, base: ReprNode, base_in: i64, base_out: i64) -> ReprNode {
        let dropouts = self
            .adapters
            .iter()
            .map(|(n, ad)| {
                let node = if ad.dropout > 0.0 {
                    ReprNode::leaf("Dropout", format!("p={}, inplace=False", py_float(ad.dropout)))
                } else {
                    ReprNode::leaf("Identity", "")
                };
                (n.clone(), node)
            })
            .collect();
        let (a_nodes, b_nodes): (Vec<_>, Vec<_>) = self
            .adapters
            .iter()
            .map(|(n, ad)| match self.base {
                BaseKind::Linear => (
                    (n.clone(), ReprNode::leaf("Linear", format!("in_features={base_in}, out_features={}, bias=False", ad.r))),
                    (n.clone(), ReprNode::leaf("Linear", format!("in_features={}, out_features={base_out}, bias=False", ad.r))),
                ),
                BaseKind::Conv2d { kernel, stride } => (
                    (
                        n.clone(),
                        ReprNode::leaf(
                            "Conv2d",
                            format!("{base_in}, {}, kernel_size=({kernel}, {kernel}), stride=({stride}, {stride}), bias=False", ad.r),
                        ),
                    ),
                    (
                        n.clone(),
                        ReprNode::leaf("Conv2d", format!("{}, {base_out}, kernel_size=(1, 1), stride=(1, 1), bias=False", ad.r)),
                    ),
                ),
            })
            .unzip();
        let dict = |children: Vec<(String, ReprNode)>| ReprNode {
            type_name: "ModuleDict".into(),
            extra: String::new(),
            children,
            is_list: false,
        };
        let (type_name, dora_type) = match self.base {
            BaseKind::Linear => ("lora.Linear", "lora.dora.DoraLinearLayer"),
            // peft 0.21 prints the conv variant's prefix twice; we print what peft prints.
            BaseKind::Conv2d { .. } => ("lora.Conv2d", "lora.dora.lora.dora.DoraConv2dLayer"),
        };
        let magnitudes = self
            .adapters
            .iter()
            .filter(|(_, ad)| ad.magnitude.is_some())
            .map(|(n, _)| (n.clone(), ReprNode::leaf(dora_type, "")))
            .collect();
        ReprNode {
            type_name: type_name.into(),
            extra: String::new(),
            children: vec![
                ("base_layer".into(), base),
                ("lora_dropout".into(), dict(dropouts)),
                ("lora_A".into(), dict(a_nodes)),
                ("lora_B".into(), dict(b_nodes)),
                ("lora_embedding_A".into(), ReprNode::leaf("ParameterDict", "")),
                ("lora_embedding_B".into(), ReprNode::leaf("ParameterDict", "")),
                ("lora_magnitude_vector".into(), dict(magnitudes)),
            ],
            is_list: false,
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}
