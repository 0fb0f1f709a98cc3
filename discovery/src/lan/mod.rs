//! LAN discovery: encrypted DNS-SD records only contacts can read.
//!
//! [`record`] is the scheme (sans-IO). The mDNS glue comes next; until then
//! nothing here sends a packet.

pub mod record;
