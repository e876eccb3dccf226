//! [`Tunings`]: how quickly the monitor decides that a node failed, and the
//! data nodes' settings that bound how long a failover's steps take.

use std::time::Duration;

/// How quickly the monitor decides that a node failed, and how quickly a
/// standby reconnects to a primary that came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunings {
    health_check_period: Duration,
    health_check_timeout: Duration,
    health_check_retry_delay: Duration,
    health_check_max_retries: u32,
    unhealthy_timeout: Duration,
    demote_timeout: Duration,
    wal_retrieve_retry_interval: Duration,
}

impl Tunings {
    /// For tests and demonstrations on one machine: the monitor checks each
    /// node every second (2 s connect timeout, two retries 500 ms apart),
    /// takes a node whose keeper has not reported for 5 s and whose checks
    /// fail for dead, and gives a dead primary 5 s to notice its demotion
    /// before the standby is promoted; standbys retry a lost WAL stream after
    /// 500 ms. (With 1 s and 3 s, a busy two-core machine made the monitor
    /// judge a live standby unhealthy: the primary then runs without
    /// synchronous replication, and a failover in that window loses what it
    /// acknowledged alone.)
    pub fn fast() -> Self {
        Tunings {
            health_check_period: Duration::from_secs(1),
            health_check_timeout: Duration::from_secs(2),
            health_check_retry_delay: Duration::from_millis(500),
            health_check_max_retries: 2,
            unhealthy_timeout: Duration::from_secs(5),
            demote_timeout: Duration::from_secs(5),
            wal_retrieve_retry_interval: Duration::from_millis(500),
        }
    }

    /// pg_auto_failover's and PostgreSQL's defaults (5 s checks, 20 s before a
    /// node is unhealthy, 30 s demote timeout, 5 s WAL retry), meant for
    /// networks where a second of silence means little.
    pub fn defaults() -> Self {
        Tunings {
            health_check_period: Duration::from_secs(5),
            health_check_timeout: Duration::from_secs(5),
            health_check_retry_delay: Duration::from_secs(2),
            health_check_max_retries: 2,
            unhealthy_timeout: Duration::from_secs(20),
            demote_timeout: Duration::from_secs(30),
            wal_retrieve_retry_interval: Duration::from_secs(5),
        }
    }

    /// How long a node's keeper may stay silent (with failing health checks)
    /// before the monitor fails the node over.
    pub fn unhealthy_timeout(&self) -> Duration {
        self.unhealthy_timeout
    }

    /// How long the monitor waits for a failed primary to acknowledge its
    /// demotion before promoting the standby.
    pub fn demote_timeout(&self) -> Duration {
        self.demote_timeout
    }

    pub(super) fn monitor_conf(&self) -> String {
        format!(
            "# written by railyard: failure detection (see Tunings)\n\
             pgautofailover.health_check_period = {}\n\
             pgautofailover.health_check_timeout = {}\n\
             pgautofailover.health_check_retry_delay = {}\n\
             pgautofailover.health_check_max_retries = {}\n\
             pgautofailover.node_considered_unhealthy_timeout = {}\n\
             pgautofailover.primary_demote_timeout = {}\n\
             fsync = off\n",
            self.health_check_period.as_millis(),
            self.health_check_timeout.as_millis(),
            self.health_check_retry_delay.as_millis(),
            self.health_check_max_retries,
            self.unhealthy_timeout.as_millis(),
            self.demote_timeout.as_millis(),
        )
    }

    /// Settings of the data nodes, copied to the standby by its base backup.
    /// `fsync` is off, as on the local cluster: a process killed with SIGKILL
    /// loses nothing the kernel holds, and every failure these nodes are put
    /// through is of a process, never of the machine. Checkpoints are quick
    /// (at most 6 s): pg_basebackup, which pg_autoctl runs without `-c fast`
    /// when a node joins or cannot be rewound, waits for one.
    pub(super) fn node_conf(&self) -> String {
        format!(
            "# written by railyard (see Tunings)\n\
             fsync = off\n\
             wal_retrieve_retry_interval = {}ms\n\
             checkpoint_timeout = 60s\n\
             checkpoint_completion_target = 0.1\n\
             max_connections = 200\n",
            self.wal_retrieve_retry_interval.as_millis()
        )
    }
}

impl Default for Tunings {
    /// [`Tunings::fast`].
    fn default() -> Self {
        Tunings::fast()
    }
}
