//! The request inspector. Input: the request path, a newline, the body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (path, body) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&b"/v1/chat/completions"[..], data),
    };
    balancer::fuzzing::inspect(&String::from_utf8_lossy(path), body);
});
