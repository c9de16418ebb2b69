//! Arbitrary rings and guest memory through the virtio-net tx and rx chain handling.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    novacron::fuzz_support::net_frame(data);
});
