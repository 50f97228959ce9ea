#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| haven_fuzz::target("undo_roll_back").run(data));
