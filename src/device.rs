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

/// The host's physical memory in bytes (None where the system does not say).
pub fn host_memory_bytes() -> Option<u128> {
    // SAFETY: sysconf only reads system constants.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && page > 0).then(|| pages as u128 * page as u128)
}

/// The memory the host can still give (Linux's `MemAvailable`: free memory plus what the page cache would
/// give back), else its physical memory.
pub fn host_available_bytes() -> Option<u128> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let available = meminfo.as_deref().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    available.or_else(host_memory_bytes)
}

/// Refuses, before allocating, a request whose memory (`bytes`, None when the count itself overflowed) is
/// more than the host has available: a MemoryError naming what was asked and how to ask for less, never an
/// abort, an allocator trace or the kernel's out-of-memory killer. Only the host's memory is known here; on
/// CUDA libtorch's own out-of-memory error (also a MemoryError in Python) says it.
pub fn check_fits(bytes: Option<u128>, device: Device, what: &str, fix: &str) -> Result<()> {
    let limit = match device {
        Device::Cpu => host_available_bytes(),
        _ => None,
    };
    match (bytes, limit) {
        (None, _) => Err(Error::OutOfMemory(format!(
            "{what} would need more memory than can be counted (over 2^128 bytes); {fix}"
        ))),
        (Some(b), Some(limit)) if b > limit => Err(Error::OutOfMemory(format!(
            "{what} would need about {:.1} GiB, more than the {:.1} GiB of memory this machine has available; \
             {fix}",
            b as f64 / (1u128 << 30) as f64,
            limit as f64 / (1u128 << 30) as f64
        ))),
        _ => Ok(()),
    }
}
