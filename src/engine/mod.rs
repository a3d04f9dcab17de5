//! One pipeline = one supervised set of tasks (reader, processor, housekeeping). Knows nothing of Kubernetes:
//! it is started with a [`PipelineConfig`](config::PipelineConfig) and reports through a [`Progress`] watch.

pub mod backfill;
pub mod backpressure;
pub mod buffer;
pub mod config;
pub mod dlq;
pub mod error;
pub mod event;
pub mod failpoint;
mod handle;
mod housekeeping;
pub mod metrics;
pub mod pg;
pub mod processor;
mod reclaim;
pub mod retry;
mod session;
mod shared;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod state;
pub mod table_name;
pub mod tls;
pub mod wide;
mod worker;

pub use self::handle::PipelineHandle;
pub use self::reclaim::{forget_buffer, reclaim};
pub use self::shared::{Progress, Shared, SlotHealth};
