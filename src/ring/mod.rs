//! Our own split-ring fast path, under both devices' hot paths: a burst of chains popped per
//! pass with one avail-index read, descriptors translated through a per-burst snapshot of the
//! memory map ([`map::MemMap`]) instead of a region search per access, used entries
//! published once per burst ([`split::SplitRing`]). The queue state itself stays in
//! virtio-queue's `Queue`, which vhost-user-backend owns.

pub mod burst;
pub mod dirty;
pub mod inflight;
pub mod map;
pub mod split;
