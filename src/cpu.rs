//! The highest x86 code path our own kernels may take, as torch names its CPU capabilities.
//!
//! Why a cap: torch, MKL, oneDNN and our kernels (the decoding kernel in `nn/few_rows.rs`, the resampling
//! passes in `processor/resize.rs`) each pick their code for the CPU they find, so one machine exercises only
//! one set of paths. Setting `BLIP_PEFT_CPU_CAPABILITY=avx2` before Python starts makes a machine with
//! AVX-512 run what an AVX2-only machine runs: the Python package passes the cap on to torch
//! (`ATEN_CPU_CAPABILITY`), MKL and oneDNN before they choose, and our kernels read it here. torch's own
//! `ATEN_CPU_CAPABILITY` alone caps our kernels too, so the two never disagree.

/// A CPU code path, lowest first (torch's names: `default`, `avx2`, `avx512`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Capability {
    /// Baseline x86-64 (SSE2) code only.
    Default,
    /// AVX2 (with FMA where a kernel needs it).
    Avx2,
    /// AVX-512.
    Avx512,
}

/// Our variable; it caps torch too (the Python package forwards it).
pub const ENV: &str = "BLIP_PEFT_CPU_CAPABILITY";
/// torch's variable, honoured when ours is not set.
pub const TORCH_ENV: &str = "ATEN_CPU_CAPABILITY";

impl Capability {
    /// torch's name for the path (`"default"`, `"avx2"`, `"avx512"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// The path a name stands for, in any letter case; `None` for a name torch does not give an x86 path.
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "default" => Some(Self::Default),
            "avx2" => Some(Self::Avx2),
            "avx512" => Some(Self::Avx512),
            _ => None,
        }
    }

    /// The cap set by the first of our variable and torch's that holds a known name (none: no cap).
    pub fn cap_from(ours: Option<&str>, torchs: Option<&str>) -> Self {
        [ours, torchs]
            .into_iter()
            .flatten()
            .find_map(Self::parse)
            .unwrap_or(Self::Avx512)
    }
}

/// The highest path our kernels may take in this process: the environment's cap, read once. Each kernel
/// still checks that the CPU has the instructions it uses.
pub fn cap() -> Capability {
    static CAP: std::sync::OnceLock<Capability> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| {
        let read = |key| std::env::var(key).ok();
        Capability::cap_from(read(ENV).as_deref(), read(TORCH_ENV).as_deref())
    })
}

/// Whether our kernels may use `path` (the cap allows it; the CPU must still be checked).
pub fn allows(path: Capability) -> bool {
    cap() >= path
}

/// This CPU's bfloat16 arithmetic ([`Bf16Support::detect`]), read once.
pub fn bf16_support() -> Bf16Support {
    static SUPPORT: std::sync::OnceLock<Bf16Support> = std::sync::OnceLock::new();
    *SUPPORT.get_or_init(Bf16Support::detect)
}

/// The CPU's bfloat16 arithmetic, as torch's bf16 matmuls (oneDNN) can use it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bf16Support {
    /// AVX-512 BF16 (`vdpbf16ps`: Intel Cooper Lake / Sapphire Rapids on, AMD Zen 4 on), usable by the OS.
    pub avx512_bf16: bool,
    /// AMX with bf16 tiles (Intel Sapphire Rapids on).
    pub amx_bf16: bool,
}

impl Bf16Support {
    /// What this CPU has (cpuid; AVX-512 BF16 only where the OS saves the AVX-512 state).
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // cpuid leaf 7, sub-leaf 0, EDX bit 22: AMX-BF16.
            // (cpuid exists on every x86-64 CPU; leaf 7 is read only when the CPU reports it.)
            let max = std::arch::x86_64::__cpuid(0).eax;
            let amx = max >= 7 && std::arch::x86_64::__cpuid_count(7, 0).edx & (1 << 22) != 0;
            Self {
                avx512_bf16: std::arch::is_x86_feature_detected!("avx512bf16"),
                amx_bf16: amx && std::arch::is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Self::default()
        }
    }

    /// Whether bf16 arithmetic runs natively here: the CPU has it and `BLIP_PEFT_CPU_CAPABILITY` does not
    /// cap the libraries below AVX-512 (oneDNN capped at AVX2 reports no bf16, and torch converts instead).
    pub fn usable(self) -> bool {
        (self.avx512_bf16 || self.amx_bf16) && allows(Capability::Avx512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_order_lowest_first() {
        for c in [Capability::Default, Capability::Avx2, Capability::Avx512] {
            assert_eq!(Capability::parse(c.name()), Some(c));
        }
        assert_eq!(Capability::parse(" AVX2 "), Some(Capability::Avx2));
        assert_eq!(Capability::parse("avx512_bf16"), None);
        assert!(Capability::Default < Capability::Avx2 && Capability::Avx2 < Capability::Avx512);
    }

    #[test]
    fn our_variable_wins_over_torchs_and_unset_means_no_cap() {
        assert_eq!(Capability::cap_from(None, None), Capability::Avx512);
        assert_eq!(Capability::cap_from(Some("avx2"), None), Capability::Avx2);
        assert_eq!(Capability::cap_from(None, Some("default")), Capability::Default);
        assert_eq!(
            Capability::cap_from(Some("avx2"), Some("default")),
            Capability::Avx2
        );
        // A name torch gives no x86 path (e.g. "zvector") is no cap, as torch ignores it here.
        assert_eq!(
            Capability::cap_from(Some("zvector"), Some("avx2")),
            Capability::Avx2
        );
    }
}
