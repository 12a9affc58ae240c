//! Parsing device and dtype names the way torch spells them.

use tch::{Device, Kind};

use crate::error::{Error, Result};

/// `"cpu"`, `"cuda"`, `"cuda:N"` to a device, checking that CUDA devices exist.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let index = match name {
        "cuda" => Some(0),
        _ => name
            .strip_prefix("cuda:")
            .map(|i| {
                i.parse::<usize>()
                    .map_err(|_| Error::invalid(format!("invalid CUDA device index in {name:?}")))
            })
            .transpose()?,
    };
    let Some(index) = index else {
        return Err(Error::invalid(format!(
            "unknown device {name:?}; use \"cpu\", \"cuda\" or \"cuda:N\""
        )));
    };
    if !tch::Cuda::is_available() {
        return Err(Error::Unsupported(format!(
            "device {name:?} was requested but CUDA is not available on this machine; use device=\"cpu\""
        )));
    }
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        return Err(Error::invalid(format!(
            "device {name:?} does not exist: this machine has {count} CUDA device(s)"
        )));
    }
    Ok(Device::Cuda(index))
}

/// `"float32"`, `"bfloat16"`, `"float16"` (and torch's aliases) to a kind.
pub fn parse_dtype(name: &str) -> Result<Kind> {
    Ok(match name.trim().trim_start_matches("torch.") {
        "float32" | "float" | "fp32" => Kind::Float,
        "bfloat16" | "bf16" => Kind::BFloat16,
        "float16" | "half" | "fp16" => Kind::Half,
        other => {
            return Err(Error::invalid(format!(
                "unsupported dtype {other:?}; use \"float32\", \"bfloat16\" or \"float16\""
            )))
        }
    })
}

/// The canonical torch string of a device (`"cpu"`, `"cuda:0"`).
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}
