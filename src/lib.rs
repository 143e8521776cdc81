//! callseal: an encryption gateway for the call data of healthcare voice agents.
//!
//! Every stored object is one AWS Encryption SDK message (format v2, suite 0x0478, framed),
//! encrypted under a data key that the practice's own key wraps. The modules follow the data path:
//!
//! - [`ids`]: validated practice ids, call ids and artifact names.
//! - [`envelope`]: the message format, as a pure synchronous core.
//! - [`keys`]: data keys, wrapping keys and keyrings.
//! - [`storage`]: object storage with atomic, create-only writes.
//! - [`tls`]: the rustls server configuration and development certificates.
//! - [`config`]: the gateway's TOML configuration.
//! - [`auth`]: bearer tokens and what each may access.
//! - [`audit`]: the hash-chained, checkpointed audit log of every access to call data.
//! - [`metrics`]: Prometheus metrics of the process.
//! - [`admin`]: the admin listener for health, readiness and metrics.
//! - [`server`]: the HTTPS gateway: routes, streaming, limits and shutdown.
//! - [`demo`]: the main job end to end with nothing set up.
//! - [`bench`]: HTTPS load against a gateway: throughput, latency, server CPU and memory.
//! - [`cli`]: the `callseal` command.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod config;
pub mod demo;
pub mod envelope;
pub mod ids;
pub mod keys;
pub mod metrics;
pub mod rewrap;
pub mod server;
pub mod storage;
pub mod tls;
pub mod webhook;
