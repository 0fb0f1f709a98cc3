//! # coterie-node
pub mod store;
pub mod stream;
