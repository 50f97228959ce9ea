#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| haven_fuzz::target("replica_journal_open").run(data));
