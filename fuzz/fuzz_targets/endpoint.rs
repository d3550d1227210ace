//! cargo-fuzz target: see `ssp_gateway_fuzz::endpoint` for the input format and the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ssp_gateway_fuzz::endpoint(data));
