//! # railyard-ops
//!
//! Tools for the people who run a database behind [`railyard`]:
//!
//! | module | what it does |
//! |---|---|
//! | [`watch`] | a live view of the last fifteen minutes, sampled from the handle |
//! | [`alert`] | rules over those samples, silences, acknowledgement, escalation, webhooks |
//! | [`advise`] | indexes to create (proved with hypopg), unused and redundant ones |
//! | [`backup`] | pgBackRest stanzas, backups of the local cluster, restore drills |
//! | [`retain`] | monthly partitions made ahead, archived and dropped on schedule |

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod advise;
pub mod alert;
pub mod backup;
pub mod error;
pub mod retain;
pub mod watch;

pub use error::Error;
