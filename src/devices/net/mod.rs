//! virtio-net (issue 4, in progress). So far the pure-logic parts: [`switch`], the L2
//! switch's forwarding core, and [`header`], virtio-net header checks and software checksums.

pub mod header;
pub mod switch;
