//! See `novacron::fuzz_support::relay_messages`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    novacron::fuzz_support::relay_messages(data);
});
