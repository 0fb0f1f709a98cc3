//! # coterie-node
pub mod invite;
pub mod ops;
pub mod store;
pub mod stream;
