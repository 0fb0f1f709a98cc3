//! The XML stream between two Coterie nodes, sans-IO.
pub mod jingle;
pub mod padding;
pub mod parser;
pub mod session;
