//! The glue: tasks that own the core's state and connect it to the edges.
//!
//! - [`bus`]: the one event bus (numbered, kept in a ring for resuming readers).
//! - [`fleet`]: the actor that owns the registry, the healer and the sessions.
//! - [`lag`]: the runtime's own scheduling delay, probed.
//! - [`log_budget`]: routine per-node log lines, counted beyond a rate.
//! - [`role`]: whether this process leads, and the leader term's handles.
//! - [`scaling_loop`]: the loop that owns the forecaster and the scaler.
//! - [`server`]: wiring, listeners and graceful shutdown.

pub mod bus;
pub mod fleet;
pub mod healing;
pub mod lag;
pub mod log_budget;
pub mod role;
pub mod scaling_loop;
pub mod server;
