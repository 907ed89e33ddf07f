//! Lines a client of the agent's socket sends: parsed or refused with a message.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = netwatch::serve::api::Request::parse(data);
});
