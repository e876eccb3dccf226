//! The servers' configuration: `railyard.conf` (written at every start, with
//! the WAL archiving settings on the primary when backups are enabled),
//! `pg_hba.conf`, and the query-insight extensions the server has.

use std::fs;
use std::path::Path;

use crate::Binaries;

/// `CREATE EXTENSION` for query insight's extensions the server has:
/// `pg_stat_statements` (statement statistics of every client) and `hypopg`
/// (hypothetical indexes, which prove index advice).
pub(crate) fn query_insight_extensions(bins: &Binaries) -> String {
    ["pg_stat_statements", "hypopg"]
        .iter()
        .filter(|e| bins.has_library(e))
        .map(|e| format!("CREATE EXTENSION IF NOT EXISTS {e};"))
        .collect()
}

/// Settings for a disposable test cluster: durability is off (`fsync`,
/// `full_page_writes`), but `synchronous_commit` stays on, which with `fsync`
/// off costs nothing and hands each commit to the walsender at once (so the
/// replica replays within a millisecond, as on a healthy production pair).
pub(crate) fn server_conf(pg: &Path, port: u16, bins: &Binaries) -> String {
    // Statement statistics of every client, for query insight, when the
    // server has the module (it ships with PostgreSQL's contrib).
    let statements = if bins.has_library("pg_stat_statements") {
        "shared_preload_libraries = 'pg_stat_statements'\n\
         compute_query_id = on\n\
         pg_stat_statements.max = 5000\n"
    } else {
        ""
    };
    format!(
        "# written by railyard at every start\n\
         port = {port}\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = '{sockets}'\n\
         ssl = on\n\
         ssl_cert_file = '{pg}/server.crt'\n\
         ssl_key_file = '{pg}/server.key'\n\
         password_encryption = 'scram-sha-256'\n\
         max_connections = 300\n\
         shared_buffers = 64MB\n\
         wal_level = logical\n\
         max_wal_senders = 10\n\
         max_replication_slots = 10\n\
         hot_standby = on\n\
         hot_standby_feedback = on\n\
         wal_keep_size = 64MB\n\
         max_wal_size = 256MB\n\
         min_wal_size = 32MB\n\
         checkpoint_timeout = 60s\n\
         fsync = off\n\
         synchronous_commit = on\n\
         full_page_writes = off\n\
         max_locks_per_transaction = 256\n\
         deadlock_timeout = 100ms\n\
         logging_collector = off\n\
         log_min_messages = warning\n\
         {statements}",
        sockets = pg.join("sockets").display(),
        pg = pg.display(),
    )
}

/// The file holding the primary's WAL archiving settings, written by
/// [`LocalCluster::set_archiving`] when backups are enabled.
pub(crate) const ARCHIVE_CONF: &str = "archive.conf";

/// The primary's settings: [`server_conf`], plus the WAL archiving settings
/// when backups are enabled (`pg/archive.conf` exists).
pub(crate) fn primary_conf(pg: &Path, port: u16, bins: &Binaries) -> String {
    let mut conf = server_conf(pg, port, bins);
    if let Ok(archive) = fs::read_to_string(pg.join(ARCHIVE_CONF)) {
        conf.push_str(&archive);
    }
    conf
}

pub(crate) const HBA: &str = "# written by railyard: TLS + scram over TCP, scram over the Unix socket\n\
local   all          all                 scram-sha-256\n\
local   replication  all                 scram-sha-256\n\
hostssl all          all   127.0.0.1/32  scram-sha-256\n\
hostssl replication  all   127.0.0.1/32  scram-sha-256\n";
