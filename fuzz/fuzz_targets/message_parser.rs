//! Fuzzes the message parser and decryptor with untrusted bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = callseal::envelope::fuzzing::decrypt_untrusted(data);
});
