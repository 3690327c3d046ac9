//! The walk that finds object ids in a body, against `serde_json`'s
//! decoding of the same body (escaped keys included). Input: a JSON body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    balancer::fuzzing::object_ids(data);
});
