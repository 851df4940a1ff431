//! What the suites share: the application started for a test (`helpers`), Stripe's API
//! faked at its HTTP boundary (`fake_stripe`), real processes and throwaway servers for
//! the fault suites (`procs`), and the deterministic lifecycle simulator (`stripe_sim`).
//! Webhooks are signed in one place: `subledger::stripe::signature::sign`, whose output a
//! unit test checks against a known header.

pub mod fake_stripe;
pub mod helpers;
pub mod procs;
pub mod stripe_sim;
