//! Activation functions by their transformers names (`ACT2FN`).

use tch::Tensor;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact (erf) GELU: transformers' "gelu".
    Gelu,
    /// Tanh-approximated GELU: "gelu_new" and "gelu_pytorch_tanh".
    GeluTanh,
    QuickGelu,
    Relu,
    Silu,
    Tanh,
}

impl Activation {
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            "tanh" => Self::Tanh,
            other => return Err(Error::config(format!("unsupported activation {other:?}"))),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Gelu => x.f_gelu("none")?,
            Self::GeluTanh => x.f_gelu("tanh")?,
            Self::QuickGelu => x.f_mul(&x.f_mul_scalar(1.702)?.f_sigmoid()?)?,
            Self::Relu => x.f_relu()?,
            Self::Silu => x.f_silu()?,
            Self::Tanh => x.f_tanh()?,
        })
    }

    /// The same function written over `x` (inference: saves a tensor the size of `x`).
    pub fn forward_in_place(&self, x: &mut Tensor) -> Result<()> {
        let _ = match self {
            Self::Gelu => x.f_gelu_("none")?,
            Self::GeluTanh => x.f_gelu_("tanh")?,
            Self::QuickGelu => {
                let gate = x.f_mul_scalar(1.702)?.f_sigmoid()?;
                x.f_mul_(&gate)?
            }
            Self::Relu => x.f_relu_()?,
            Self::Silu => x.f_silu_()?,
            Self::Tanh => x.f_tanh_()?,
        };
        Ok(())
    }

    /// The class torch (transformers' ACT2FN) uses for this activation.
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Gelu => "GELUActivation",
            Self::GeluTanh => "NewGELUActivation",
            Self::QuickGelu => "QuickGELUActivation",
            Self::Relu => "ReLU",
            Self::Silu => "SiLU",
            Self::Tanh => "Tanh",
        }
    }
}

/// An activation module prints as its class name alone (`GELUActivation()`).
impl crate::nn::Module for Activation {
    fn type_name(&self) -> &str {
        self.class_name()
    }
}
