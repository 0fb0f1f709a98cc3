//! # coterie-node
pub mod store;
