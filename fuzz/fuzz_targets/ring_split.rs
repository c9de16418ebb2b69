//! Arbitrary rings, descriptor tables and pop/use/put-back sequences through our split-ring
//! engine, checked against virtio-queue's reading of the same ring.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    novacron::fuzz_support::ring_split(data);
});
