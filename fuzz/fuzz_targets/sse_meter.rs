//! The stream meter. Input: a byte giving the chunk size, then an
//! upstream's answer, relayed in chunks of that size.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((size, body)) = data.split_first() else {
        return;
    };
    let chunks: Vec<&[u8]> = body.chunks(usize::from(*size) + 1).collect();
    let _ = balancer::fuzzing::sse(&chunks);
});
