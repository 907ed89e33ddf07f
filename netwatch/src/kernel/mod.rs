//! The kernel side: loading the programs ([`loader`]) with the struct offsets read from BTF
//! ([`btf`]), attaching each on its own (`attach`) and saying what each gives and how it
//! fared ([`hooks`]), and the ring buffer they fill, decoded into events ([`events`]).
mod attach;
pub mod btf;
pub mod events;
pub mod hooks;
pub mod loader;
