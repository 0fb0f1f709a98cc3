//! # coterie-node
pub mod invite;
pub mod omemo;
pub mod ops;
pub mod runtime;
pub mod settings;
pub mod store;
pub mod stream;
