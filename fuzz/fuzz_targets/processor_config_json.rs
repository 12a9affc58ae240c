//! cargo-fuzz target: `blip_peft::fuzzing::processor_config_json` (what it checks is documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blip_peft::fuzzing::allow_caught_panics();
    blip_peft::fuzzing::processor_config_json(data)
});
