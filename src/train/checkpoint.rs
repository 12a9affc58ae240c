//! Training checkpoints: `output_dir/checkpoint-<step>/` holding the trained weights (a PEFT adapter, or the
//! whole model for full fine-tuning), the optimizer moments and `trainer_state.json`. A checkpoint is written
//! into a temporary folder and renamed into place, so a crash never leaves a half-written one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::optim::AdamW;
use super::task::TrainTask;
use crate::error::{Error, Result};
use crate::weights::{save_safetensors, write_atomic, SafetensorsFiles};

pub const STATE_NAME: &str = "trainer_state.json";
pub const OPTIMIZER_NAME: &str = "optimizer.safetensors";

/// What `trainer_state.json` records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub global_step: i64,
    pub total_steps: i64,
    pub seed: i64,
    pub loss_scale: Option<f64>,
    pub growth_tracker: Option<i64>,
    /// Names of the trained parameters, in optimizer order (checked on resume).
    pub trainable: Vec<String>,
    pub history: Vec<super::trainer::StepLog>,
    pub eval_history: Vec<(i64, f64)>,
    /// Every evaluation's metrics (absent in states written before they were recorded).
    #[serde(default)]
    pub metric_history: Vec<super::trainer::EvalRecord>,
    /// transformers' `TrainerState` names: the best value of `metric_for_best_model`, the step it was
    /// reached at, and the checkpoint written at that step (kept by `save_total_limit`).
    #[serde(default)]
    pub best_metric: Option<f64>,
    #[serde(default)]
    pub best_global_step: Option<i64>,
    #[serde(default)]
    pub best_model_checkpoint: Option<PathBuf>,
}

impl TrainerState {
    /// The values a state file must hold to be resumed from (a file edited by hand or from elsewhere says
    /// what is wrong in it, instead of failing later in the loop).
    fn check(&self, path: &Path) -> Result<()> {
        let bad = |what: String| {
            Err(Error::checkpoint(format!(
                "{} is not a usable trainer state: {what}; resume from another checkpoint (or start afresh)",
                path.display()
            )))
        };
        if self.global_step < 0 {
            return bad(format!(
                "global_step is {} (a step count, never negative)",
                self.global_step
            ));
        }
        if self.total_steps < 0 {
            return bad(format!("total_steps is {} (never negative)", self.total_steps));
        }
        if let Some(scale) = self.loss_scale.filter(|s| !(s.is_finite() && *s > 0.0)) {
            return bad(format!("loss_scale is {scale} (a positive finite number)"));
        }
        if let Some(step) = self.best_global_step.filter(|&s| s < 0 || s > self.global_step) {
            return bad(format!(
                "best_global_step is {step}, outside 0..={}",
                self.global_step
            ));
        }
        if let Some(step) = self
            .history
            .iter()
            .map(|l| l.step)
            .find(|&s| s < 0 || s > self.global_step)
        {
            return bad(format!(
                "its history has a step {step} outside 0..={}",
                self.global_step
            ));
        }
        Ok(())
    }
}

/// How the trained weights are stored in a checkpoint.
pub enum WeightsFormat<'a> {
    /// A PEFT adapter: `adapter_model.safetensors` + `adapter_config.json` (given as JSON text).
    Adapter {
        name: &'a str,
        bias: &'a str,
        config_json: &'a str,
    },
    /// The whole model: `model.safetensors` + `config.json`.
    Full,
}

pub fn checkpoint_dir(output_dir: &Path, step: i64) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Writes a complete checkpoint for `state.global_step`, then enforces `save_total_limit`: the oldest
/// checkpoints go first, except `state.best_model_checkpoint`, which is kept (as transformers keeps it).
pub fn save<T: TrainTask + ?Sized>(
    output_dir: &Path,
    model: &mut T,
    optimizer: &AdamW,
    state: &TrainerState,
    format: &WeightsFormat,
    save_total_limit: Option<usize>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(output_dir)
        .map_err(|e| Error::io(format!("cannot create output_dir {}", output_dir.display()), e))?;
    remove_leftovers(output_dir);
    let final_dir = checkpoint_dir(output_dir, state.global_step);
    let tmp = output_dir.join(format!(
        ".checkpoint-{}.tmp-{}",
        state.global_step,
        std::process::id()
    ));
    if tmp.exists() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(format!("cannot create {}", tmp.display()), e))?;
    let result = (|| -> Result<()> {
        let metadata = Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )]));
        match format {
            WeightsFormat::Adapter {
                name,
                bias,
                config_json,
            } => crate::lora::inject::save_adapter(model.lora_host(), &tmp, name, bias, config_json)?,
            WeightsFormat::Full => model.save_pretrained(&tmp)?,
        }
        model.save_extra(&tmp)?;
        let mut moments = Vec::with_capacity(2 * optimizer.states.len());
        for s in &optimizer.states {
            moments.push((format!("{}.exp_avg", s.name), s.exp_avg.shallow_clone()));
            moments.push((format!("{}.exp_avg_sq", s.name), s.exp_avg_sq.shallow_clone()));
        }
        save_safetensors(&moments, metadata, &tmp.join(OPTIMIZER_NAME))?;
        let text = serde_json::to_string_pretty(state)
            .map_err(|e| Error::invalid(format!("cannot serialise state: {e}")))?;
        write_atomic(&tmp.join(STATE_NAME), text.as_bytes())?;
        if final_dir.exists() {
            discard(&final_dir)
                .map_err(|e| Error::io(format!("cannot replace {}", final_dir.display()), e))?;
        }
        std::fs::rename(&tmp, &final_dir)
            .map_err(|e| Error::io(format!("cannot move checkpoint into {}", final_dir.display()), e))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Some(limit) = save_total_limit {
        let mut all = list(output_dir)?;
        let best = state.best_model_checkpoint.as_ref().and_then(|b| b.file_name());
        // The best checkpoint counts toward the limit but is never the one removed.
        let mut removable: Vec<PathBuf> = all
            .drain(..)
            .map(|(_, dir)| dir)
            .filter(|dir| best.is_none() || dir.file_name() != best)
            .collect();
        let kept_best = usize::from(best.is_some_and(|b| output_dir.join(b).is_dir()));
        while removable.len() + kept_best > limit.max(1) && !removable.is_empty() {
            let oldest = removable.remove(0);
            if oldest == final_dir {
                continue; // the checkpoint just written stays (a limit of 1 keeps it and the best)
            }
            let _ = discard(&oldest);
        }
    }
    Ok(final_dir)
}

/// Removes what a run killed midway left in `output_dir`: the hidden temporary folder of a checkpoint being
/// written (`.checkpoint-<step>.tmp-<pid>`), a checkpoint being deleted (`.deleting-checkpoint-<step>-<pid>`)
/// and a file being written atomically (`.<name>.tmp-<pid>`), each only when the process that made it is gone
/// (a run still writing into the same folder keeps its own). Returns what was removed. Errors are ignored:
/// leftovers are never loaded (their names are outside the `checkpoint-*` namespace), only untidy.
pub fn remove_leftovers(output_dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = leftover_pid(&name) else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let gone = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if gone.is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// The writer's process id in the name of a temporary our writers make (see [`remove_leftovers`]).
fn leftover_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let pid = if rest.starts_with("deleting-checkpoint-") {
        rest.rsplit_once('-')?.1
    } else {
        rest.rsplit_once(".tmp-")?.1
    };
    pid.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists (EPERM: it exists, owned by someone else).
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    alive || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Deletes a checkpoint folder so that a crash midway never leaves a half-deleted one under its name: it
/// is first renamed out of the `checkpoint-*` namespace (atomic), then removed.
fn discard(dir: &Path) -> std::io::Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let doomed = dir.with_file_name(format!(".deleting-{name}-{}", std::process::id()));
    std::fs::rename(dir, &doomed)?;
    std::fs::remove_dir_all(&doomed)
}

/// Where a run resumes from (`resume_from_checkpoint`): the newest complete checkpoint in the output folder
/// (`True`), or a given checkpoint folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeFrom {
    Latest,
    Folder(PathBuf),
}

impl ResumeFrom {
    /// The checkpoint folder to read: the newest one [`list`] finds in `output_dir`, or the given folder.
    pub fn folder(&self, output_dir: Option<&Path>) -> Result<PathBuf> {
        match self {
            Self::Latest => {
                let Some(out) = output_dir else {
                    return Err(Error::invalid(
                        "resume_from_checkpoint=True needs output_dir (where the checkpoints are)",
                    ));
                };
                match list(out)?.pop() {
                    Some((_, dir)) => Ok(dir),
                    None => Err(Error::not_found(
                        "a checkpoint-<step> folder to resume from (in output_dir)",
                        out,
                    )),
                }
            }
            Self::Folder(dir) if dir.is_dir() => Ok(dir.clone()),
            Self::Folder(dir) => Err(Error::not_found("checkpoint to resume from", dir)),
        }
    }
}

/// Complete checkpoints in `output_dir`, oldest first.
pub fn list(output_dir: &Path) -> Result<Vec<(i64, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Ok(out);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<i64>().ok())
        {
            if entry.path().join(STATE_NAME).is_file() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Reads a checkpoint's state and loads its optimizer moments into `optimizer` (names must match).
pub fn load_state(dir: &Path, optimizer: &mut AdamW) -> Result<TrainerState> {
    let state_path = dir.join(STATE_NAME);
    let text = std::fs::read_to_string(&state_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::not_found("checkpoint (trainer_state.json)", &state_path),
        _ => Error::io(format!("cannot read {}", state_path.display()), e),
    })?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| {
        Error::checkpoint(format!(
            "{} is not a valid trainer state: {e}",
            state_path.display()
        ))
    })?;
    state.check(&state_path)?;
    let names: Vec<&String> = optimizer.states.iter().map(|s| &s.name).collect();
    if state.trainable.iter().collect::<Vec<_>>() != names {
        return Err(Error::checkpoint(format!(
            "checkpoint {} was made for other trainable parameters ({} in the checkpoint, {} now); resume with \
             the same model and LoRA config",
            dir.display(),
            state.trainable.len(),
            names.len()
        )));
    }
    let files = SafetensorsFiles::open(&[dir.join(OPTIMIZER_NAME)])?;
    let mut loaded: BTreeMap<String, Tensor> = BTreeMap::new();
    for name in files.names() {
        if let Some(t) = files.read(name)? {
            loaded.insert(name.clone(), t);
        }
    }
    let _guard = tch::no_grad_guard();
    for s in &mut optimizer.states {
        for (suffix, target) in [("exp_avg", &mut s.exp_avg), ("exp_avg_sq", &mut s.exp_avg_sq)] {
            let key = format!("{}.{suffix}", s.name);
            let src = loaded.get(&key).ok_or_else(|| {
                Error::checkpoint(format!(
                    "optimizer state `{key}` is missing from {}",
                    dir.display()
                ))
            })?;
            if src.size() != target.size() {
                return Err(Error::checkpoint(format!(
                    "optimizer state `{key}` has shape {:?} but the parameter has {:?}",
                    src.size(),
                    target.size()
                )));
            }
            target.f_copy_(&src.f_to_kind(target.kind())?.f_to_device(target.device())?)?;
        }
    }
    optimizer.step = state.global_step;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_takes_the_newest_complete_checkpoint() {
        let out = tempfile::tempdir().unwrap();
        for (step, complete) in [(3, true), (12, true), (20, false)] {
            let dir = checkpoint_dir(out.path(), step);
            std::fs::create_dir_all(&dir).unwrap();
            if complete {
                std::fs::write(dir.join(STATE_NAME), "{}").unwrap();
            }
        }
        let latest = ResumeFrom::Latest.folder(Some(out.path())).unwrap();
        assert_eq!(latest, checkpoint_dir(out.path(), 12)); // checkpoint-20 is half-written
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            ResumeFrom::Latest.folder(Some(empty.path())),
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            ResumeFrom::Latest.folder(None),
            Err(Error::InvalidArgument(_))
        ));
        let missing = ResumeFrom::Folder(out.path().join("nope"));
        assert!(matches!(missing.folder(None), Err(Error::NotFound { .. })));
    }
}
