//! # coterie-ui
//!
//! The Coterie desktop app (egui/eframe). The node runs in-process on a
//! backend thread; the UI never blocks a frame on the store, the network or
//! Tor.
//!
//! ```text
//!  ┌──────────── UI thread ────────────┐        ┌──── backend thread (tokio) ────┐
//!  │ view::App ── Command ─────────────┼──────▶ │ backend: Store, Node, status   │
//!  │   ▲  reduce(State, Action)        │        │                                │
//!  │   └──────────── Action ◀──────────┼─────── │ answers + NodeEvents, wake()   │
//!  └───────────────────────────────────┘        └────────────────────────────────┘
//! ```
//!
//! - [`state`]: the pure reducer, unit-tested;
//! - [`backend`]: owns the store and the node, answers commands;
//! - [`view`]: egui widgets, each with an accessible name;
//! - [`qr`]: the invite's QR code.

pub mod backend;
pub mod qr;
pub mod state;
pub mod view;

pub use backend::{Backend, BackendConfig, Command};
pub use state::{Action, State, reduce};
pub use view::App;
