//! The table's filter language: any words parse or fail naming a token; parsed filters run.
#![no_main]
use std::net::{IpAddr, Ipv4Addr};

use netwatch::{
    query::ss::{Endpoints, parse},
    host::services::Services,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let words: Vec<String> = text.split_whitespace().map(String::from).collect();
    if let Ok(query) = parse(&words, &Services::parse("http 80/tcp\n"))
        && let Some(expr) = query.expr
    {
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let _ = expr.matches(&Endpoints { local: (localhost, 80), remote: (localhost, 40000) });
    }
});
