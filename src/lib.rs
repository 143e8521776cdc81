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
//! - [`cli`]: the `callseal` command.

#![forbid(unsafe_code)]

pub mod cli;
pub mod envelope;
pub mod ids;
pub mod keys;
pub mod storage;
pub mod tls;
