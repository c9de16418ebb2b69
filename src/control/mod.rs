//! The control plane: JSON-RPC 2.0 over a unix socket ([`server`]), its framing
//! ([`protocol`]) and methods ([`methods`]). Management layers and `novactl` use it to add and
//! remove devices while VMs run and to read statistics; [`client`] is the one client of it.

pub mod client;
pub mod handover;
pub mod methods;
pub mod protocol;
pub mod server;
pub mod upgrade;
