//! The start sequence: join a running cluster, or start it warm (the data
//! directories exist) or cold (initdb, certificates, base backup).

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use railyard::config::Secret;
use rand::RngExt;
use rand::distr::Alphanumeric;

use crate::admin::replica_streams;
use crate::certs::generate_certs;
use crate::conf::{HBA, primary_conf, query_insight_extensions, server_conf};
use crate::error::Error;
use crate::process::{port_free, run};
use crate::{
    Binaries, DBNAME, LocalCluster, LocalClusterBuilder, RunAs, SLOT, StartKind, State, USER,
    admin_client_port, free_port, lock, pg_ctl, pg_running, write_file,
};

/// What the steps of a start share: the cluster's directories, the server
/// binaries, the servers' account, and the runtime that the steps' SQL
/// blocks on.
struct Start<'a> {
    dir: &'a PathBuf,
    pg: PathBuf,
    primary: PathBuf,
    replica: PathBuf,
    bins: Binaries,
    run_as: RunAs,
    handle: &'a tokio::runtime::Handle,
}

/// Joins the cluster in `b.dir` when it runs, else starts it: warm when its
/// data directories exist, cold (from scratch) otherwise.
pub(crate) fn start_blocking(
    b: &LocalClusterBuilder,
    handle: &tokio::runtime::Handle,
) -> Result<LocalCluster, Error> {
    let started = Instant::now();
    let bins = Binaries::find()?;
    let run_as = RunAs::detect()?;
    let dir = &b.dir;
    let _lock = lock(dir)?;
    let pg = dir.join("pg");
    let start = Start {
        dir,
        primary: pg.join("primary"),
        replica: pg.join("replica"),
        pg,
        bins,
        run_as,
        handle,
    };
    let saved = fs::read_to_string(dir.join("state"))
        .ok()
        .and_then(|s| State::parse(&s));

    let primary_up = pg_running(&start.bins, &start.primary);
    let replica_up = !b.replica || pg_running(&start.bins, &start.replica);
    if let Some(state) = &saved
        && primary_up
        && replica_up
        && (state.replica_port.is_some() || !b.replica)
    {
        return Ok(LocalCluster {
            dir: dir.clone(),
            state: state.clone(),
            started: StartKind::Joined,
            start_time: started.elapsed(),
            bindir: start.bins.dir,
        });
    }

    let cold = saved.is_none() || !start.primary.join("PG_VERSION").exists();
    let kind = if cold {
        StartKind::Cold
    } else {
        StartKind::Warm
    };
    if cold {
        start.clear()?;
    }
    start.prepare_dirs()?;
    let mut state = match (&saved, cold) {
        (Some(s), false) => s.clone(),
        _ => new_state(),
    };
    if cold {
        start.init_primary(&state)?;
    }
    // The primary: reuse its port when still free.
    if !primary_up {
        start.start_primary(&mut state)?;
    }
    start.create_databases(&state, cold)?;
    if b.replica {
        start.replica(&mut state)?;
    } else {
        state.replica_port = None;
    }
    write_file(&dir.join("state"), state.render().as_bytes(), 0o600, None)?;
    let elapsed = started.elapsed();
    tracing::info!(target: "railyard::local", ?kind, ?elapsed, dir = %dir.display(), "local cluster running");
    Ok(LocalCluster {
        dir: dir.clone(),
        state,
        started: kind,
        start_time: elapsed,
        bindir: start.bins.dir,
    })
}

/// A new cluster's state: no ports yet, a generated password.
fn new_state() -> State {
    State {
        primary_port: 0,
        replica_port: None,
        password: Secret::new(
            rand::rng()
                .sample_iter(&Alphanumeric)
                .take(32)
                .map(char::from)
                .collect::<String>(),
        ),
    }
}

impl Start<'_> {
    /// Stops what runs of a half-made cluster and removes its data
    /// directories and saved state, before a cold start.
    fn clear(&self) -> Result<(), Error> {
        let Start {
            pg, bins, run_as, ..
        } = self;
        // Start over: a half-made directory from a failed start is of no use.
        if pg.exists() {
            for d in ["replica", "primary"] {
                if pg_running(bins, &pg.join(d)) {
                    let _ = pg_ctl(
                        bins,
                        run_as,
                        pg,
                        &["stop", "-m", "immediate", "-w", "-D", d],
                    );
                }
            }
            fs::remove_dir_all(pg)
                .map_err(|e| Error::io(format!("clearing {}", pg.display()), e))?;
        }
        let _ = fs::remove_file(self.dir.join("state"));
        Ok(())
    }

    /// The cluster's directory and the servers' socket directory, owned by
    /// the servers' account.
    fn prepare_dirs(&self) -> Result<(), Error> {
        let Start {
            dir, pg, run_as, ..
        } = self;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))?;
        fs::create_dir_all(pg.join("sockets"))
            .map_err(|e| Error::io(format!("creating {}", pg.display()), e))?;
        run_as.own(pg)?;
        run_as.own(&pg.join("sockets"))?;
        Ok(())
    }

    /// A cold start's primary: certificates, `initdb` with the generated
    /// password, and its `postgresql.conf` and `pg_hba.conf`.
    fn init_primary(&self, state: &State) -> Result<(), Error> {
        let Start {
            dir,
            pg,
            primary,
            bins,
            run_as,
            ..
        } = self;
        generate_certs(dir, pg, run_as)?;
        let pwfile = pg.join("pwfile");
        write_file(
            &pwfile,
            state.password.expose().as_bytes(),
            0o600,
            Some(run_as),
        )?;
        let mut c = run_as.command(&bins.bin("initdb"), pg);
        c.arg("-D")
            .arg(primary)
            .args([
                "-U",
                USER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        let r = run(c, "initdb");
        let _ = fs::remove_file(&pwfile);
        r?;
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(primary.join("postgresql.conf"))
            .map_err(|e| Error::io("opening postgresql.conf", e))?;
        conf.write_all(b"\ninclude_if_exists = 'railyard.conf'\n")
            .map_err(|e| Error::io("writing postgresql.conf", e))?;
        write_file(
            &primary.join("pg_hba.conf"),
            HBA.as_bytes(),
            0o600,
            Some(run_as),
        )?;
        Ok(())
    }

    /// Starts the primary, on its saved port when still free.
    fn start_primary(&self, state: &mut State) -> Result<(), Error> {
        let Start {
            pg, bins, run_as, ..
        } = self;
        if state.primary_port == 0 || !port_free(state.primary_port) {
            state.primary_port = free_port()?;
        }
        start_server(
            bins,
            run_as,
            pg,
            "primary",
            &primary_conf(pg, state.primary_port, bins),
        )
    }

    /// The query-insight extensions, and on a cold start the application's
    /// database.
    fn create_databases(&self, state: &State, cold: bool) -> Result<(), Error> {
        let Start { dir, handle, .. } = self;
        let password = state.password.clone();
        let primary_port = state.primary_port;
        let extensions = query_insight_extensions(&self.bins);
        if cold {
            handle.block_on(async {
                // In template1 first, so that every database created later has them.
                let template = admin_client_port(dir, primary_port, &password, "template1").await?;
                if let Err(e) = template.batch_execute(&extensions).await {
                    // Query insight degrades without them; the cluster still serves.
                    tracing::warn!(target: "railyard::local", error = %e, "could not create the query-insight extensions");
                }
                drop(template);
                let client = admin_client_port(dir, primary_port, &password, "postgres").await?;
                client
                    .batch_execute(&format!("CREATE DATABASE {DBNAME}"))
                    .await
                    .map_err(|e| Error::Local(format!("creating database {DBNAME}: {e}")))
            })?;
        } else if !extensions.is_empty() {
            // A cluster made before the extensions were: its application
            // database gets them (two starts racing may both try; one wins).
            let _ = handle.block_on(async {
                let client = admin_client_port(dir, primary_port, &password, DBNAME).await?;
                client
                    .batch_execute(&extensions)
                    .await
                    .map_err(|e| Error::Local(e.to_string()))
            });
        }
        Ok(())
    }

    /// The replica: a base backup when it has none, started when it does not
    /// run, then streaming.
    fn replica(&self, state: &mut State) -> Result<(), Error> {
        let Start {
            dir,
            replica,
            handle,
            ..
        } = self;
        let password = state.password.clone();
        let primary_port = state.primary_port;
        let needs_backup = !replica.join("PG_VERSION").exists();
        if needs_backup {
            self.base_backup(primary_port, &password)?;
        }
        if !pg_running(&self.bins, replica) {
            self.start_replica(state)?;
        }
        // Wait until the replica streams.
        handle.block_on(async {
            let client = admin_client_port(dir, primary_port, &password, "postgres").await?;
            replica_streams(&client, "after its start").await
        })?;
        Ok(())
    }

    /// The replica's data directory: `pg_basebackup` from the primary with a
    /// replication slot, its connection settings left to `railyard.conf`.
    fn base_backup(&self, primary_port: u16, password: &Secret) -> Result<(), Error> {
        let Start {
            dir,
            pg,
            replica,
            bins,
            run_as,
            handle,
            ..
        } = self;
        let _ = fs::remove_dir_all(replica);
        // The slot may be left from an earlier, failed backup.
        let _ = handle.block_on(async {
            let client = admin_client_port(dir, primary_port, password, "postgres").await?;
            client
                .batch_execute(&format!(
                    "SELECT pg_drop_replication_slot('{SLOT}') FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
                ))
                .await
                .map_err(|e| Error::Local(e.to_string()))
        });
        let mut c = run_as.command(&bins.bin("pg_basebackup"), pg);
        c.arg("-D")
            .arg(replica)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary_port.to_string(),
                "-U",
                USER,
            ])
            .args([
                "-R",
                "-X",
                "stream",
                "-C",
                "-S",
                SLOT,
                "--no-sync",
                "-c",
                "fast",
            ])
            .env("PGPASSWORD", password.expose())
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", dir.join("ca.crt"))
            .env("PGAPPNAME", "railyard_replica");
        run(c, "pg_basebackup")?;
        // -R wrote primary_conninfo into postgresql.auto.conf; we keep it in
        // railyard.conf instead, rewritten with the primary's port at each start.
        let auto = replica.join("postgresql.auto.conf");
        let text = fs::read_to_string(&auto).unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|l| !l.starts_with("primary_conninfo") && !l.starts_with("primary_slot_name"))
            .map(|l| format!("{l}\n"))
            .collect();
        write_file(&auto, kept.as_bytes(), 0o600, Some(run_as))?;
        Ok(())
    }

    /// Starts the replica on a free port, following the primary.
    fn start_replica(&self, state: &mut State) -> Result<(), Error> {
        let Start {
            dir,
            pg,
            bins,
            run_as,
            ..
        } = self;
        let password = &state.password;
        let primary_port = state.primary_port;
        if state
            .replica_port
            .is_none_or(|p| !port_free(p) || p == primary_port)
        {
            state.replica_port = Some(free_port()?);
        }
        let port = state.replica_port.expect("set just above");
        let conninfo = format!(
            "host=127.0.0.1 port={primary_port} user={USER} password={} sslmode=verify-full sslrootcert={} application_name=railyard_replica",
            password.expose(),
            dir.join("ca.crt").display()
        );
        let conf = format!(
            "{}primary_conninfo = '{}'\nprimary_slot_name = '{SLOT}'\n",
            server_conf(pg, port, bins),
            conninfo.replace('\'', "''")
        );
        start_server(bins, run_as, pg, "replica", &conf)
    }
}

/// Writes a server's `railyard.conf` into `pg/<name>` and starts it, its log
/// in `pg/<name>.log`, waiting up to 60 s.
fn start_server(
    bins: &Binaries,
    run_as: &RunAs,
    pg: &Path,
    name: &str,
    conf: &str,
) -> Result<(), Error> {
    write_file(
        &pg.join(name).join("railyard.conf"),
        conf.as_bytes(),
        0o600,
        Some(run_as),
    )?;
    let log = format!("{name}.log");
    pg_ctl(
        bins,
        run_as,
        pg,
        &["start", "-w", "-t", "60", "-D", name, "-l", &log],
    )
}
