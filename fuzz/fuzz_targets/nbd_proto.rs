#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| haven_fuzz::target("nbd_proto").run(data));
