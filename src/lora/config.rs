//! `LoraConfig` with peft's field names, defaults and validation. It reads peft's
//! `adapter_config.json` (unknown keys are ignored, as peft 0.21 does) and writes the fields peft knows.

use regex::Regex;
use serde_json::Value;

use crate::error::{Error, Result};

/// Which modules get an adapter: a list (exact name or dot-boundary suffix), a regex (full match) or
/// every Linear (`"all-linear"`).
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
    AllLinear,
}

impl TargetModules {
    fn from_json(value: &Value) -> Result<Option<Self>> {
        Ok(match value {
            Value::Null => None,
            Value::String(s) if s == "all-linear" => Some(Self::AllLinear),
            Value::String(s) => Some(Self::Regex(s.clone())),
            Value::Array(items) => Some(Self::List(string_list(items, "target_modules")?)),
            _ => {
                return Err(Error::invalid(
                    "target_modules must be a list of names, a regex string or \"all-linear\"",
                ))
            }
        })
    }

    pub fn to_json(&self) -> Value {
        match self {
            Self::List(items) => {
                let mut sorted = items.clone();
                sorted.sort();
                sorted.dedup();
                Value::from(sorted)
            }
            Self::Regex(s) => Value::from(s.clone()),
            Self::AllLinear => Value::from("all-linear"),
        }
    }
}

fn string_list(items: &[Value], field: &str) -> Result<Vec<String>> {
    items
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| Error::invalid(format!("{field} must hold strings, found {v}")))
        })
        .collect()
}

/// A rank/alpha pattern's entries in their given order: a JSON object (a file; its key order is lost, and
/// peft writes keys sorted anyway) or a list of `[key, value]` pairs (from Python, keeping dict order).
fn pattern_entries<'a>(value: &'a Value, field: &str) -> Result<Vec<(String, &'a Value)>> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Object(m) => Ok(m.iter().map(|(k, v)| (k.clone(), v)).collect()),
        Value::Array(items) => items
            .iter()
            .map(|item| match item.as_array().map(Vec::as_slice) {
                Some([Value::String(k), v]) => Ok((k.clone(), v)),
                _ => Err(Error::invalid(format!(
                    "{field} must map module patterns to numbers, got {item}"
                ))),
            })
            .collect(),
        v => Err(Error::invalid(format!("{field} must be a dict, got {v}"))),
    }
}

/// How the adapter's A and B start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitLoraWeights {
    /// A kaiming-uniform(a=√5), B zeros: the adapter starts as a no-op.
    Default,
    /// A and B with torch's default Linear init: not a no-op (for tests and debugging).
    Random,
    /// A ~ N(0, 1/r), B zeros.
    Gaussian,
    /// PiSSA: A and B from the top `r` singular vectors of W, which keeps the rest (Linear only).
    Pissa,
    /// OLoRA: A and B from the QR decomposition of W, which keeps the rest (Linear only).
    Olora,
}

impl InitLoraWeights {
    /// Whether the init reads (and rewrites) the base weight, which only Linear layers allow.
    pub fn rewrites_base(&self) -> bool {
        matches!(self, Self::Pissa | Self::Olora)
    }

    /// The value `adapter_config.json` holds for it.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Default => Value::Bool(true),
            Self::Random => Value::Bool(false),
            Self::Gaussian => Value::from("gaussian"),
            Self::Pissa => Value::from("pissa"),
            Self::Olora => Value::from("olora"),
        }
    }
}

/// peft's rule for keeping LoRA out of a `modules_to_save` module: the module path is `name` or lies inside
/// it (`(^|.*\.)NAME($|\..*)`, with `name` read as a regex as peft does).
pub fn saved_module_regex(name: &str) -> std::result::Result<Regex, regex::Error> {
    Regex::new(&format!(r"^(.*\.)?(?:{name})($|\..*)"))
}

/// A rank/alpha pattern as the JSON object peft writes.
fn pattern_json<T: Copy + Into<Value>>(pattern: &[(String, T)]) -> Value {
    Value::Object(pattern.iter().map(|(k, v)| (k.clone(), (*v).into())).collect())
}

/// The fields of peft's `LoraConfig` that apply to BLIP.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: i64,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Option<TargetModules>,
    pub exclude_modules: Option<TargetModules>,
    pub bias: String,
    pub modules_to_save: Option<Vec<String>>,
    pub init_lora_weights: InitLoraWeights,
    pub use_rslora: bool,
    pub use_dora: bool,
    /// Per-module overrides in the order given (peft: the first key that matches wins).
    pub rank_pattern: Vec<(String, i64)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub layers_to_transform: Option<Vec<i64>>,
    pub layers_pattern: Option<Vec<String>>,
    pub task_type: Option<String>,
    pub inference_mode: bool,
    pub base_model_name_or_path: Option<String>,
    pub fan_in_fan_out: bool,
    pub lora_bias: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            exclude_modules: None,
            bias: "none".into(),
            modules_to_save: None,
            init_lora_weights: InitLoraWeights::Default,
            use_rslora: false,
            use_dora: false,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            layers_to_transform: None,
            layers_pattern: None,
            task_type: None,
            inference_mode: false,
            base_model_name_or_path: None,
            fan_in_fan_out: false,
            lora_bias: false,
        }
    }
}

fn get<'a>(obj: &'a serde_json::Map<String, Value>, key: &str) -> &'a Value {
    obj.get(key).unwrap_or(&Value::Null)
}

fn as_f64(v: &Value, field: &str) -> Result<f64> {
    v.as_f64()
        .ok_or_else(|| Error::invalid(format!("{field} must be a number, got {v}")))
}

fn as_i64(v: &Value, field: &str) -> Result<i64> {
    match v {
        Value::Number(n) if n.is_i64() => Ok(n.as_i64().unwrap_or_default()),
        Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => {
            Ok(n.as_f64().unwrap_or_default() as i64)
        }
        _ => Err(Error::invalid(format!("{field} must be an integer, got {v}"))),
    }
}

fn as_bool(v: &Value, field: &str, default: bool) -> Result<bool> {
    match v {
        Value::Null => Ok(default),
        Value::Bool(b) => Ok(*b),
        _ => Err(Error::invalid(format!("{field} must be true or false, got {v}"))),
    }
}

impl LoraConfig {
    /// Parses peft's `adapter_config.json` (or the same fields from Python), then validates.
    pub fn from_json(value: &Value) -> Result<Self> {
        let Value::Object(obj) = value else {
            return Err(Error::invalid("a LoRA config must be a JSON object"));
        };
        if let Some(t) = obj.get("peft_type").and_then(Value::as_str) {
            if t != "LORA" {
                return Err(Error::invalid(format!(
                    "peft_type is {t:?}; only LoRA adapters (\"LORA\") are supported"
                )));
            }
        }
        let mut c = LoraConfig::default();
        if !get(obj, "r").is_null() {
            c.r = as_i64(get(obj, "r"), "r")?;
        }
        if !get(obj, "lora_alpha").is_null() {
            c.lora_alpha = as_f64(get(obj, "lora_alpha"), "lora_alpha")?;
        }
        if !get(obj, "lora_dropout").is_null() {
            c.lora_dropout = as_f64(get(obj, "lora_dropout"), "lora_dropout")?;
        }
        c.target_modules = TargetModules::from_json(get(obj, "target_modules"))?;
        c.exclude_modules = TargetModules::from_json(get(obj, "exclude_modules"))?;
        if let Some(TargetModules::AllLinear) = c.exclude_modules {
            c.exclude_modules = Some(TargetModules::Regex("all-linear".into()));
        }
        c.bias = match get(obj, "bias") {
            Value::Null => "none".into(),
            Value::String(s) => s.clone(),
            v => {
                return Err(Error::invalid(format!(
                    "bias must be \"none\", \"all\" or \"lora_only\", got {v}"
                )))
            }
        };
        c.modules_to_save = match get(obj, "modules_to_save") {
            Value::Null => None,
            Value::Array(items) => Some(string_list(items, "modules_to_save")?),
            Value::String(s) => Some(vec![s.clone()]),
            v => {
                return Err(Error::invalid(format!(
                    "modules_to_save must be a list of names, got {v}"
                )))
            }
        };
        c.init_lora_weights = match get(obj, "init_lora_weights") {
            Value::Null | Value::Bool(true) => InitLoraWeights::Default,
            Value::Bool(false) => InitLoraWeights::Random,
            Value::String(s) if s == "gaussian" => InitLoraWeights::Gaussian,
            Value::String(s) if s == "pissa" => InitLoraWeights::Pissa,
            Value::String(s) if s.to_lowercase() == "olora" => InitLoraWeights::Olora,
            Value::String(s) => {
                return Err(Error::invalid(format!(
                    "init_lora_weights={s:?} is not supported; use True, False, \"gaussian\", \"pissa\" or \"olora\""
                )))
            }
            v => {
                return Err(Error::invalid(format!(
                    "init_lora_weights must be True, False, \"gaussian\", \"pissa\" or \"olora\", got {v}"
                )))
            }
        };
        c.use_rslora = as_bool(get(obj, "use_rslora"), "use_rslora", false)?;
        c.use_dora = as_bool(get(obj, "use_dora"), "use_dora", false)?;
        c.inference_mode = as_bool(get(obj, "inference_mode"), "inference_mode", false)?;
        c.fan_in_fan_out = as_bool(get(obj, "fan_in_fan_out"), "fan_in_fan_out", false)?;
        c.lora_bias = as_bool(get(obj, "lora_bias"), "lora_bias", false)?;
        for (k, v) in pattern_entries(get(obj, "rank_pattern"), "rank_pattern")? {
            let r = as_i64(v, &format!("rank_pattern[{k:?}]"))?;
            c.rank_pattern.push((k, r));
        }
        for (k, v) in pattern_entries(get(obj, "alpha_pattern"), "alpha_pattern")? {
            let a = as_f64(v, &format!("alpha_pattern[{k:?}]"))?;
            c.alpha_pattern.push((k, a));
        }
        c.layers_to_transform = match get(obj, "layers_to_transform") {
            Value::Null => None,
            Value::Array(items) => Some(
                items
                    .iter()
                    .map(|v| as_i64(v, "layers_to_transform"))
                    .collect::<Result<Vec<_>>>()?,
            ),
            v => Some(vec![as_i64(v, "layers_to_transform")?]),
        };
        c.layers_pattern = match get(obj, "layers_pattern") {
            Value::Null => None,
            Value::String(s) => Some(vec![s.clone()]),
            Value::Array(items) => Some(string_list(items, "layers_pattern")?),
            v => {
                return Err(Error::invalid(format!(
                    "layers_pattern must be a string or a list, got {v}"
                )))
            }
        };
        c.task_type = get(obj, "task_type").as_str().map(str::to_string);
        c.base_model_name_or_path = get(obj, "base_model_name_or_path").as_str().map(str::to_string);
        c.validate()?;
        Ok(c)
    }

    /// The checks peft's `LoraConfig.__post_init__` makes, plus the ones its injection makes later.
    pub fn validate(&self) -> Result<()> {
        if self.r <= 0 {
            return Err(Error::invalid(format!(
                "`r` should be a positive integer value but the value passed is {}",
                self.r
            )));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::invalid(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            )));
        }
        if !["none", "all", "lora_only"].contains(&self.bias.as_str()) {
            return Err(Error::invalid(format!(
                "bias must be \"none\", \"all\" or \"lora_only\", got {:?}",
                self.bias
            )));
        }
        for (k, r) in &self.rank_pattern {
            if *r <= 0 {
                return Err(Error::invalid(format!(
                    "rank_pattern[{k:?}] must be a positive rank, got {r}"
                )));
            }
        }
        let keys = self.rank_pattern.iter().map(|(k, _)| k);
        for pattern in keys.chain(self.alpha_pattern.iter().map(|(k, _)| k)) {
            Regex::new(&format!("^(.*\\.)?({pattern})$")).map_err(|e| {
                Error::invalid(format!(
                    "invalid regex {pattern:?} in rank_pattern/alpha_pattern: {e}"
                ))
            })?;
        }
        for t in [&self.target_modules, &self.exclude_modules]
            .into_iter()
            .flatten()
        {
            if let TargetModules::Regex(r) = t {
                Regex::new(&format!("^(?:{r})$")).map_err(|e| {
                    Error::invalid(format!(
                        "invalid regex {r:?} in target_modules/exclude_modules: {e}"
                    ))
                })?;
            }
        }
        if self.layers_to_transform.is_some() && matches!(self.target_modules, Some(TargetModules::Regex(_)))
        {
            return Err(Error::invalid(
                "`layers_to_transform` cannot be used when `target_modules` is a str.",
            ));
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return Err(Error::invalid(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified. ",
            ));
        }
        if self.lora_bias {
            return Err(Error::invalid("lora_bias=True is not supported"));
        }
        for m in self.modules_to_save.iter().flatten() {
            if m.is_empty() {
                return Err(Error::invalid("modules_to_save holds an empty name"));
            }
            saved_module_regex(m).map_err(|e| {
                Error::invalid(format!("modules_to_save entry {m:?} is not a valid pattern: {e}"))
            })?;
        }
        Ok(())
    }

    /// The rank and alpha for the module at `path`, honouring `rank_pattern` / `alpha_pattern` (first match wins).
    pub fn rank_alpha(&self, path: &str) -> (i64, f64) {
        let matches = |key: &str| {
            Regex::new(&format!("^(.*\\.)?({key})$"))
                .map(|re| re.is_match(path))
                .unwrap_or(false)
        };
        let r = self
            .rank_pattern
            .iter()
            .find(|(k, _)| matches(k))
            .map_or(self.r, |(_, r)| *r);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| matches(k))
            .map_or(self.lora_alpha, |(_, a)| *a);
        (r, alpha)
    }

    /// The scaling a module of rank `r` and `alpha` gets.
    pub fn scaling(&self, r: i64, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// peft's `adapter_config.json` for this config (sorted keys, sets as sorted lists, `inference_mode` true).
    pub fn to_json(&self) -> Value {
        let targets = self
            .target_modules
            .as_ref()
            .map(TargetModules::to_json)
            .unwrap_or(Value::Null);
        let excludes = self
            .exclude_modules
            .as_ref()
            .map(TargetModules::to_json)
            .unwrap_or(Value::Null);
        let init = self.init_lora_weights.to_json();
        let alpha = if self.lora_alpha.fract() == 0.0 {
            Value::from(self.lora_alpha as i64)
        } else {
            Value::from(self.lora_alpha)
        };
        let auto_mapping = if self.task_type.is_none() {
            serde_json::json!({
                "base_model_class": "BlipForConditionalGeneration",
                "parent_library": "transformers.models.blip.modeling_blip"
            })
        } else {
            Value::Null
        };
        serde_json::json!({
            "alpha_pattern": pattern_json(&self.alpha_pattern),
            "auto_mapping": auto_mapping,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": self.bias,
            "exclude_modules": excludes,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": init,
            "layers_pattern": self.layers_pattern.as_ref().map(|p| if p.len() == 1 { Value::from(p[0].clone()) } else { Value::from(p.clone()) }),
            "layers_to_transform": self.layers_to_transform,
            "lora_alpha": alpha,
            "lora_bias": false,
            "lora_dropout": self.lora_dropout,
            "modules_to_save": self.modules_to_save,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": pattern_json(&self.rank_pattern),
            "revision": Value::Null,
            "target_modules": targets,
            "task_type": self.task_type,
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_patterns() {
        let c = LoraConfig::from_json(&serde_json::json!({
            "r": 4, "target_modules": ["query"], "rank_pattern": {"value": 2}, "alpha_pattern": {"layer\\.0\\..*query": 16}
        }))
        .unwrap();
        assert_eq!(c.rank_alpha("text.layer.0.attention.self.value"), (2, 8.0));
        assert_eq!(c.rank_alpha("text.layer.0.attention.self.query"), (4, 16.0));
        assert_eq!(c.rank_alpha("text.layer.1.attention.self.query"), (4, 8.0));
        assert_eq!(c.scaling(4, 8.0), 2.0);
    }

    #[test]
    fn invalid_configs_are_rejected() {
        for bad in [
            serde_json::json!({"r": 0}),
            serde_json::json!({"lora_dropout": 1.0}),
            serde_json::json!({"bias": "some"}),
            serde_json::json!({"init_lora_weights": "magic"}),
            serde_json::json!({"target_modules": "(unclosed"}),
            serde_json::json!({"target_modules": "q", "layers_to_transform": [0]}),
        ] {
            assert!(LoraConfig::from_json(&bad).is_err(), "{bad}");
        }
    }
}
