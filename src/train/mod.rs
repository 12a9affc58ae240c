//! Fine-tuning: the optimizer (AdamW with torch's numerics), learning-rate schedules, gradient clipping and
//! fp16 loss scaling, checkpoints, and the training loop itself, with the process settings it runs under
//! (flush-to-zero, freed memory kept).

pub mod checkpoint;
pub mod checkpointed_step;
pub mod denormals;
pub mod feature_cache;
pub mod optim;
pub mod task;
pub mod trainer;

pub use optim::{AdamW, LossScaler, Schedule};
pub use task::{RetrievalTask, TrainTask};
pub use trainer::{StepLog, TrainConfig, TrainOutcome, Trainer};
