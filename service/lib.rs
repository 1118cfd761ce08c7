//! queuectl: a durable queue of shell commands behind a gRPC contract.
//!
//! [`job`] holds the lifecycle rules as pure code; [`store`] is the seam to the database; [`supervisor`] and
//! [`runner`] execute jobs; [`queue`] offers the operations; [`grpc`] carries them; [`server`] wires it all.

#[cfg(target_os = "linux")]
pub mod cgroup;
#[cfg(unix)]
pub mod channel;
pub mod clock;
pub mod config;
pub mod connections;
pub mod containment;
pub mod convert;
pub mod error;
pub mod event;
pub mod grpc;
pub mod health;
pub mod home;
pub mod job;
pub mod metrics;
pub mod notify;
pub mod output;
pub mod queue;
#[cfg(target_os = "linux")]
pub mod reaper;
pub mod runner;
pub mod server;
pub mod server_args;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod watch;
pub mod writer;

/// The generated types and stubs of `proto/queuectl/v1/queue.proto`.
pub mod pb {
    tonic::include_proto!("queuectl.v1");
}

/// The contract's descriptors, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/queuectl_descriptor.bin"));
