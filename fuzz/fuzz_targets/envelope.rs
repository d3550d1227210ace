//! cargo-fuzz target: see `ssp_gateway_fuzz::envelope` for the input format and the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ssp_gateway_fuzz::envelope(data));
