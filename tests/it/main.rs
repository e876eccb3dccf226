//! Railyard's integration tests: one binary, a module per concern, all against a
//! real PostgreSQL (the local cluster, or `TEST_DATABASE_URL`).

mod advise;
mod backup;
mod changes;
mod config;
mod connect;
mod dashboard;
mod entry_points;
mod faults;
mod ha;
mod harness;
mod listen;
mod local;
mod migrations;
mod observe;
mod pooler;
mod proxy;
mod retain;
mod route;
mod shedding;
mod shutdown;
mod storm;
mod support;
// The reference application's retention and invariants, as the binary uses them.
#[path = "../../src/app/check.rs"]
#[allow(dead_code)]
mod ledger_check;
#[path = "../../src/app/retain.rs"]
#[allow(dead_code)]
mod ledger_retain;
mod tls;
mod tx;
mod wire;
mod workload;
