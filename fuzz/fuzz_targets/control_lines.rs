//! See `novacron::fuzz_support::control_lines`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    novacron::fuzz_support::control_lines(data);
});
