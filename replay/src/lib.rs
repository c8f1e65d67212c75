//! `chat-replay`: the operator tool that treats the event table as what it is, the room's
//! history, and works from it.
//!
//! Each module owns one concern:
//! - [`cli`]: the command line (clap) and the wiring of one command to the modules below;
//! - [`aws`]: the SDK configuration for AWS or a local endpoint, and what SDK errors mean to an
//!   operator (a missing table, an unreachable endpoint);
//! - [`range`]: the id and time ranges the commands select events by;
//! - [`log`]: reading a room's event log in id order, page by page, in constant memory;
//! - [`export`]: the log as JSON Lines;
//! - [`redeliver`]: re-driving the fan-out of a stretch of the log to the current members;
//! - [`rebuild`]: deriving the connections table's state from the log, reporting and fixing
//!   drift;
//! - [`progress`]: the progress bar on a terminal, nothing when stderr is piped;
//! - [`error`]: the one error type, whose messages say what to fix.

pub mod aws;
pub mod cli;
pub mod error;
pub mod export;
pub mod log;
pub mod progress;
pub mod range;
pub mod rebuild;
pub mod redeliver;

pub use error::ReplayError;
