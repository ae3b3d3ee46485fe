//! Fuzz the webhook parser with deliveries that claim to come from Github.
#![no_main]

use davit_coordinator_fuzz::state::records::ScmType;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| davit_coordinator_fuzz::check_delivery(ScmType::Github, data));
