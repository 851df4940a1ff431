//! The webhook's untrusted input, end to end through the pure code: the `Stripe-Signature`
//! header and the body (split at the first newline), verified, parsed and routed.
//!
//! Properties: nothing panics; a body signed with the secret always verifies; a body that
//! parses always routes. Must never touch a database (the `stripe` module does no IO).

#![no_main]

use libfuzzer_sys::fuzz_target;
use subledger::stripe::signature::sign;
use subledger::stripe::{parse_event, route, verify_signature};

const SECRETS: [&str; 2] = ["whsec_old", "whsec_fuzz"];
const NOW: i64 = 1_764_000_000;

fuzz_target!(|data: &[u8]| {
    let (header, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&[][..], data),
    };
    let header = std::str::from_utf8(header).ok();
    let _ = verify_signature(header, body, &SECRETS, NOW, 300);

    let good = sign("whsec_fuzz", NOW - 10, body);
    assert!(verify_signature(Some(&good), body, &SECRETS, NOW, 300).is_ok());

    if let Ok(event) = parse_event(body) {
        let _ = route(&event);
    }
});
