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

    /// The class name torch prints for this activation.
    pub fn repr(&self) -> &'static str {
        match self {
            Self::Gelu => "GELUActivation()",
            Self::GeluTanh => "NewGELUActivation()",
            Self::QuickGelu => "QuickGELUActivation()",
            Self::Relu => "ReLU()",
            Self::Silu => "SiLU()",
            Self::Tanh => "Tanh()",
        }
    }
}
