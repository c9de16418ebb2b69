//! virtio-net (issue 4, in progress). So far: [`switch`], the L2 switch's forwarding core.

pub mod switch;
