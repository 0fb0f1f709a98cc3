//! LAN discovery: encrypted DNS-SD records only contacts can read.
//!
//! [`record`] is the scheme (sans-IO); [`mdns`] publishes and browses the
//! records with `mdns-sd`. Only ever start it inside a network namespace in
//! tests: it multicasts on every interface it sees.

pub mod mdns;
pub mod record;
pub mod xep0174;
