//! The kernel side: loading and attaching the programs ([`loader`]) with the struct offsets
//! read from BTF ([`btf`]), and the ring buffer they fill, decoded into events ([`events`]).
pub mod btf;
pub mod events;
pub mod loader;
