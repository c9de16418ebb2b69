//! Arbitrary bytes as a cold-tier record and as a tier metadata journal.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    novacron::fuzz_support::tier_record(data);
});
