//! An upstream's rate-limit and retry headers. Input: `name: value` lines.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pairs: Vec<(String, &[u8])> = data
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let at = line.iter().position(|b| *b == b':')?;
            let name = String::from_utf8_lossy(&line[..at]).trim().to_ascii_lowercase();
            Some((name, line[at + 1..].trim_ascii()))
        })
        .collect();
    let pairs: Vec<(&str, &[u8])> = pairs.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    balancer::fuzzing::rate_limit_headers(&pairs);
});
