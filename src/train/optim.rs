//! AdamW exactly as `torch.optim.AdamW` computes it, transformers' learning-rate schedules, global-norm
//! gradient clipping and a dynamic fp16 loss scaler — all without reading values back to the host.

use std::f64::consts::PI;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// transformers' `get_scheduler` shapes, as a factor of the base learning rate per optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

impl Schedule {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "constant" | "constant_with_warmup" => Self::Constant,
            other => {
                return Err(Error::invalid(format!(
                    "lr_scheduler must be \"linear\", \"cosine\" or \"constant\", got {other:?}"
                )))
            }
        })
    }

    /// The factor for optimizer step `step` (0-based) of `total`, after `warmup` linear warm-up steps.
    pub fn factor(&self, step: i64, warmup: i64, total: i64) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
        match self {
            Self::Constant => 1.0,
            Self::Linear => ((total - step) as f64 / (total - warmup).max(1) as f64).max(0.0),
            Self::Cosine => (0.5 * (1.0 + (PI * progress).cos())).max(0.0),
        }
    }
}

/// One trainable parameter with its AdamW state.
#[derive(Debug)]
pub struct AdamState {
    pub name: String,
    pub param: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Whether weight decay applies (not to retrieval's temperature).
    pub decay: bool,
}

/// `torch.optim.AdamW` (decoupled weight decay, no amsgrad), step for step.
#[derive(Debug)]
pub struct AdamW {
    pub states: Vec<AdamState>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken.
    pub step: i64,
}

impl AdamW {
    pub fn new(
        params: Vec<(String, Tensor)>,
        betas: (f64, f64),
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        let states = params
            .into_iter()
            .map(|(name, param)| {
                Ok(AdamState {
                    exp_avg: param.f_zeros_like()?,
                    exp_avg_sq: param.f_zeros_like()?,
                    decay: true,
                    name,
                    param,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            states,
            beta1: betas.0,
            beta2: betas.1,
            eps,
            weight_decay,
            step: 0,
        })
    }

    /// Adds a trained tensor that takes no weight decay (as a torch parameter group with `weight_decay=0`).
    pub fn push_without_decay(&mut self, name: String, param: Tensor) -> Result<()> {
        self.states.push(AdamState {
            exp_avg: param.f_zeros_like()?,
            exp_avg_sq: param.f_zeros_like()?,
            decay: false,
            name,
            param,
        });
        Ok(())
    }

    /// Applies one update with learning rate `lr` to every parameter that has a gradient.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let bias1 = 1.0 - self.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - self.beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias1;
        for s in &mut self.states {
            let grad = s.param.grad();
            if !grad.defined() {
                continue;
            }
            let grad = if grad.kind() != s.exp_avg.kind() {
                grad.f_to_kind(s.exp_avg.kind())?
            } else {
                grad
            };
            let mut p = s.param.shallow_clone();
            if self.weight_decay != 0.0 && s.decay {
                let _ = p.f_mul_scalar_(1.0 - lr * self.weight_decay)?;
            }
            let _ = s.exp_avg.f_lerp_(&grad, 1.0 - self.beta1)?;
            let _ = s.exp_avg_sq.f_mul_scalar_(self.beta2)?;
            let _ = s
                .exp_avg_sq
                .f_addcmul_(&grad, &grad.f_mul_scalar(1.0 - self.beta2)?)?;
            let denom = s
                .exp_avg_sq
                .f_sqrt()?
                .f_div_scalar(bias2_sqrt)?
                .f_add_scalar(self.eps)?;
            let update = s.exp_avg.f_div(&denom)?.f_mul_scalar(-step_size)?;
            let _ = p.f_add_(&update.f_to_kind(p.kind())?)?;
        }
        Ok(())
    }

    /// Clears every gradient (`zero_grad(set_to_none=True)`).
    pub fn zero_grad(&mut self) -> Result<()> {
        for s in &mut self.states {
            let mut g = s.param.grad();
            if g.defined() {
                let _ = g.f_detach_()?;
                let _ = g.f_zero_()?;
            }
        }
        Ok(())
    }

    /// The gradients, for clipping and checks.
    pub fn grads(&self) -> Vec<Tensor> {
        self.states
            .iter()
            .map(|s| s.param.grad())
            .filter(Tensor::defined)
            .collect()
    }
}

/// `torch.nn.utils.clip_grad_norm_`: scales all gradients so their global 2-norm is at most `max_norm`.
/// Returns the norm before clipping, as a device tensor (no host read).
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<Tensor> {
    if grads.is_empty() {
        return Ok(Tensor::from(0.0f32));
    }
    let norms = grads
        .iter()
        .map(|g| g.f_to_kind(Kind::Float)?.f_norm().map_err(Error::from))
        .collect::<Result<Vec<_>>>()?;
    let total = Tensor::f_stack(&norms, 0)?.f_norm()?;
    if max_norm > 0.0 && max_norm.is_finite() {
        let coef = total
            .f_add_scalar(1e-6)?
            .f_reciprocal()?
            .f_mul_scalar(max_norm)?
            .f_clamp_max(1.0)?;
        let _guard = tch::no_grad_guard();
        for g in grads {
            let mut g = g.shallow_clone();
            let _ = g.f_mul_(&coef.f_to_kind(g.kind())?)?;
        }
    }
    Ok(total)
}

/// Dynamic loss scaling for fp16 (torch's `GradScaler` defaults): steps whose gradients hold inf/NaN are
/// skipped and the scale halves; after 2000 good steps it doubles.
#[derive(Debug)]
pub struct LossScaler {
    pub scale: Tensor,
    pub growth_tracker: Tensor,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: i64,
}

impl LossScaler {
    pub fn new(init_scale: f64, device: tch::Device) -> Result<Self> {
        Ok(Self {
            scale: Tensor::f_full([1], init_scale, (Kind::Float, device))?,
            growth_tracker: Tensor::f_zeros([1], (Kind::Int, device))?,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        })
    }

    /// Unscales `grads` in place; returns a device flag (`[1]`, float) that is 1 when any was inf/NaN.
    pub fn unscale(&self, grads: &[Tensor]) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let inv = self.scale.f_reciprocal()?;
        let mut flags = Vec::with_capacity(grads.len());
        for g in grads {
            flags.push(g.f_isfinite()?.f_logical_not()?.f_any()?);
            let mut g = g.shallow_clone();
            let _ = g.f_mul_(&inv.f_to_kind(g.kind())?)?;
        }
        if flags.is_empty() {
            return Ok(Tensor::f_zeros([1], (Kind::Float, self.scale.device()))?);
        }
        Ok(Tensor::f_stack(&flags, 0)?
            .f_any()?
            .f_to_kind(Kind::Float)?
            .f_view([1])?)
    }

    /// Adjusts the scale after a step given its `found_inf` flag.
    pub fn update(&mut self, found_inf: &Tensor) -> Result<()> {
        let _ = self.scale.f_internal_amp_update_scale_(
            &self.growth_tracker,
            found_inf,
            self.growth_factor,
            self.backoff_factor,
            self.growth_interval,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers() {
        assert_eq!(Schedule::Linear.factor(0, 0, 10), 1.0);
        assert_eq!(Schedule::Linear.factor(5, 0, 10), 0.5);
        assert_eq!(Schedule::Linear.factor(1, 2, 10), 0.5);
        assert!((Schedule::Cosine.factor(5, 0, 10) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::Constant.factor(7, 0, 10), 1.0);
    }
}
