//! Arbitrary descriptor chains and guest memory through the virtio-blk request path.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    novacron::fuzz_support::blk_request(data);
});
