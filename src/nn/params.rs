//! Where parameters come from and how the model tree is walked.

use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// How a parameter is initialised when it is not read from a checkpoint (transformers' `_init_weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal(f64),
    TruncNormal(f64),
    Zeros,
    Ones,
}

/// Supplies a tensor for each parameter as the model is built, by its full path.
pub trait ParamSource {
    /// The parameter `name` of `shape`, on the model's device and in `kind` (float32 for the
    /// parameters that must stay in full precision).
    fn param(&mut self, name: &str, shape: &[i64], init: Init, kind: Kind) -> Result<Tensor>;

    /// The kind the model is being built in.
    fn kind(&self) -> Kind;

    /// Marks `name` as known but unused (a tied alias or a buffer that older checkpoints store).
    fn ignore(&mut self, _name: &str) {}

    /// The tensor stored under `name`, if this source reads stored tensors and has it (not marked used).
    fn stored(&mut self, _name: &str) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// Visits parameters in registration order with their full dotted paths. Tied parameters are visited once.
pub type ParamVisitor<'a> = dyn FnMut(&str, &Tensor) + 'a;

/// Visits the same parameters as [`ParamVisitor`], able to replace them (modules_to_save swaps in its copies).
pub type ParamVisitorMut<'a> = dyn FnMut(&str, &mut Tensor) + 'a;

/// Joins a module prefix and a child name with a dot.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// A source of freshly initialised parameters, seeded, as transformers initialises a new model.
pub struct RandomInit {
    kind: Kind,
    device: Device,
}

impl RandomInit {
    pub fn new(seed: i64, kind: Kind, device: Device) -> Self {
        tch::manual_seed(seed);
        Self { kind, device }
    }
}

impl ParamSource for RandomInit {
    fn param(&mut self, _name: &str, shape: &[i64], init: Init, kind: Kind) -> Result<Tensor> {
        let opts = (Kind::Float, self.device);
        let t = match init {
            Init::Zeros => Tensor::f_zeros(shape, opts)?,
            Init::Ones => Tensor::f_ones(shape, opts)?,
            Init::Normal(std) => Tensor::f_randn(shape, opts)?.f_mul_scalar(std)?,
            Init::TruncNormal(std) => {
                // Truncated at two standard deviations, like torch.nn.init.trunc_normal_ (a=-2, b=2 in std units).
                let t = Tensor::f_randn(shape, opts)?;
                t.f_clamp(-2.0, 2.0)?.f_mul_scalar(std)?
            }
        };
        Ok(t.f_to_kind(kind)?)
    }

    fn kind(&self) -> Kind {
        self.kind
    }
}
