//! Ring buffer records: anything the kernel side could hand over decodes or is an error.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = netwatch::kernel::events::decode(data);
});
