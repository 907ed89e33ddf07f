//! What netwatch reads from the host outside its event stream: the one-time socket snapshot
//! (sock_diag in every namespace, `/proc` as fallback, the fd-to-process join) and service
//! names from `/etc/services`.
pub mod services;
pub mod snapshot;
