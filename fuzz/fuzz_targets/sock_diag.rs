//! sock_diag reply datagrams: truncated or corrupt netlink messages are errors, not panics.
#![no_main]
use netwatch::host::{snapshot::Protocol, sock_diag::parse_replies};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut rows = Vec::new();
    let exact = data.first().is_some_and(|b| b & 1 == 1);
    let _ = parse_replies(data, 1, 1, Protocol::Tcp, exact, &mut rows);
});
