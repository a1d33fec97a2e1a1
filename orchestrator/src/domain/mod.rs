//! The pure core: what decides. No IO, no tonic or HTTP types, time passed in, so
//! every piece is unit-tested with a fake clock.
//!
//! - [`node`] and [`event`]: the domain types.
//! - [`registry`]: the node lifecycle state machine (sessions, states, marks); it
//!   returns effects instead of acting. Its time-driven half, the periodic
//!   dead-node check over a schedule of due nodes, is [`registry::detector`].
//! - [`healer`]: failures -> heal / hold / mass-failure alert within the limits
//!   (`runtime::healing` turns its decisions into events and durable writes).
//! - [`forecast`]: fleet CPU history, models, scoring and confidence; backtests.
//! - [`scaler`]: forecast + fleet view -> scale up / down / hold.
//! - [`selector`]: label selectors and node filters for queries.

pub mod event;
pub mod forecast;
pub mod healer;
pub mod node;
pub mod registry;
pub mod scaler;
pub mod selector;
