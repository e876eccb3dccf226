//! Creating a formation (or starting a stopped one): our own `initdb` with our
//! `pg_hba.conf` and settings, `pg_autoctl create monitor`, then the two nodes
//! (`pg_autoctl create postgres`; the second one is a base backup of the
//! first), each then run by its `pg_autoctl run` service.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::RngExt;
use rand::distr::Alphanumeric;

use super::process::{self, Tools};
use super::{
    APP_DB, APP_USER, Formation, FormationBuilder, MONITOR, NODES, REPLICATOR, STATE_FILE, State,
    Tunings, connect_socket, pg_error, stop_locked,
};
use crate::error::Error;
use crate::{RunAs, StartKind};
use railyard::config::Secret;

const MONITOR_HBA: &str = "# written by railyard: the socket (in a 0700 directory) and pg_autoctl's keepers\n\
local   all               all                         trust\n\
hostssl pg_auto_failover  autoctl_node  127.0.0.1/32  trust\n";

const NODE_HBA: &str = "# written by railyard: the socket (in a 0700 directory), TLS + scram over TCP\n\
local   all          all                        trust\n\
local   replication  all                        trust\n\
hostssl all          all          127.0.0.1/32  scram-sha-256\n\
hostssl replication  all          127.0.0.1/32  scram-sha-256\n";

/// Polls until a server of the formation answers over its socket.
fn wait_for_server(
    handle: &tokio::runtime::Handle,
    ha: &Path,
    port: u16,
    user: &str,
    db: &str,
    within: Duration,
) -> Result<tokio_postgres::Client, Error> {
    let end = Instant::now() + within;
    loop {
        match handle.block_on(connect_socket(ha, port, user, db)) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= end => {
                return Err(Error::Local(format!(
                    "the server on port {port} did not answer within {within:?}: {e}"
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn random_password() -> Secret {
    Secret::new(
        rand::rng()
            .sample_iter(&Alphanumeric)
            .take(32)
            .map(char::from)
            .collect::<String>(),
    )
}

fn private_dir(path: &Path, run_as: &RunAs) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    run_as.own(path)
}

// Long by design: start or join, in the order the states on disk call for.
pub(super) fn start_blocking(
    b: &FormationBuilder,
    handle: &tokio::runtime::Handle,
) -> Result<Formation, Error> {
    let started = Instant::now();
    let tools = Tools::find()?;
    let run_as = RunAs::detect()?;
    let dir = &b.dir;
    let _lock = crate::lock(dir)?;
    let ha = dir.join("ha");
    let services = [MONITOR, NODES[0], NODES[1]];

    if let Some(state) = State::read(dir)
        && services
            .iter()
            .all(|n| ha.join(n).join("PG_VERSION").exists())
    {
        let mut f = Formation {
            dir: dir.clone(),
            state,
            tools,
            run_as,
            started: StartKind::Joined,
            start_time: Duration::ZERO,
        };
        for name in services {
            if process::service_pid(&ha, name).is_none() {
                f.started = StartKind::Warm;
                process::spawn_service(&f.run_as, &f.tools, &ha, name)?;
            }
        }
        handle.block_on(f.wait_stable(Duration::from_secs(60)))?;
        f.start_time = started.elapsed();
        return Ok(f);
    }

    // Cold: whatever a failed start left is of no use.
    if ha.exists() {
        stop_locked(dir, &run_as, Some(&tools))?;
        fs::remove_dir_all(&ha).map_err(|e| Error::io(format!("clearing {}", ha.display()), e))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))?;
    for d in ["", "run", "sockets", "tls", "config", "data"] {
        private_dir(&ha.join(d), &run_as)?;
    }
    crate::generate_certs(dir, &ha.join("tls"), &run_as)?;
    let replication = random_password();
    crate::write_file(
        &ha.join("pgpass"),
        format!("127.0.0.1:*:*:{REPLICATOR}:{}\n", replication.expose()).as_bytes(),
        0o600,
        Some(&run_as),
    )?;
    let mut ports = Vec::new();
    while ports.len() < 3 {
        let p = crate::free_port()?;
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    let state = State {
        monitor_port: ports[0],
        node_ports: [ports[1], ports[2]],
        password: random_password(),
    };
    let f = Formation {
        dir: dir.clone(),
        state,
        tools,
        run_as,
        started: StartKind::Cold,
        start_time: Duration::ZERO,
    };
    if let Err(e) = create(&f, &b.tunings, &replication, handle) {
        // What did start is stopped: a failed start leaves nothing running.
        if let Err(stop) = stop_locked(dir, &f.run_as, Some(&f.tools)) {
            tracing::warn!(target: "railyard::local", error = %stop, "could not stop a formation that failed to start");
        }
        return Err(e);
    }
    crate::write_file(
        &dir.join(STATE_FILE),
        f.state.render().as_bytes(),
        0o600,
        None,
    )?;
    let f = Formation {
        start_time: started.elapsed(),
        ..f
    };
    tracing::info!(target: "railyard::local", elapsed = ?f.start_time, dir = %dir.display(), "pg_auto_failover formation running");
    Ok(f)
}

/// `initdb` of our own, before pg_autoctl takes the directory over: our
/// `pg_hba.conf`, and our settings in `railyard.conf` (included before the
/// file pg_autoctl adds, which does not set them).
fn initdb(f: &Formation, name: &str, hba: &str, conf: &str) -> Result<(), Error> {
    let ha = f.ha();
    let pgdata = ha.join(name);
    let mut c = process::command(&f.run_as, &f.tools, &ha, &f.tools.bindir.join("initdb"));
    c.arg("-D").arg(&pgdata).args([
        "--auth=trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
        "--no-instructions",
    ]);
    process::run_logged(
        c,
        "initdb",
        &ha.join(format!("create-{name}.log")),
        Duration::from_secs(60),
    )?;
    crate::write_file(
        &pgdata.join("pg_hba.conf"),
        hba.as_bytes(),
        0o600,
        Some(&f.run_as),
    )?;
    crate::write_file(
        &pgdata.join("railyard.conf"),
        conf.as_bytes(),
        0o600,
        Some(&f.run_as),
    )?;
    let main = pgdata.join("postgresql.conf");
    let mut text = fs::read_to_string(&main)
        .map_err(|e| Error::io(format!("reading {}", main.display()), e))?;
    text.push_str("\ninclude_if_exists = 'railyard.conf'\n");
    crate::write_file(&main, text.as_bytes(), 0o600, Some(&f.run_as))
}

/// `pg_autoctl create …` with the formation's TLS options.
fn autoctl_create(f: &Formation, name: &str, args: &[String]) -> Result<(), Error> {
    let ha = f.ha();
    let tls = ha.join("tls");
    let mut c = process::command(&f.run_as, &f.tools, &ha, &f.tools.autoctl);
    c.arg("create")
        .args(args)
        .arg("--pgdata")
        .arg(ha.join(name))
        .args([
            "--hostname",
            "127.0.0.1",
            "--skip-pg-hba",
            "--ssl-mode",
            "verify-full",
        ])
        .arg("--ssl-ca-file")
        .arg(f.ca_cert())
        .arg("--server-cert")
        .arg(tls.join("server.crt"))
        .arg("--server-key")
        .arg(tls.join("server.key"))
        .arg("--pgctl")
        .arg(f.tools.bindir.join("pg_ctl"));
    process::run_logged(
        c,
        &format!("pg_autoctl create ({name})"),
        &ha.join(format!("create-{name}.log")),
        Duration::from_secs(120),
    )
}

// Long by design: the formation's steps in the order pg_autoctl needs them, each a call and its wait.
fn create(
    f: &Formation,
    tunings: &Tunings,
    replication: &Secret,
    handle: &tokio::runtime::Handle,
) -> Result<(), Error> {
    let ha = f.ha();
    let [p1, p2] = f.state.node_ports;

    // The monitor.
    initdb(f, MONITOR, MONITOR_HBA, &tunings.monitor_conf())?;
    autoctl_create(
        f,
        MONITOR,
        &[
            "monitor".into(),
            "--pgport".into(),
            f.state.monitor_port.to_string(),
        ],
    )?;
    // pg_autoctl has the monitor listen on every address unless told.
    let mut c = process::command(&f.run_as, &f.tools, &ha, &f.tools.autoctl);
    c.args(["config", "set", "--pgdata"])
        .arg(ha.join(MONITOR))
        .args(["postgresql.listen_addresses", "127.0.0.1"]);
    process::run_output(c, "pg_autoctl config set", Duration::from_secs(30))?;
    process::spawn_service(&f.run_as, &f.tools, &ha, MONITOR)?;
    wait_for_server(
        handle,
        &ha,
        f.state.monitor_port,
        "autoctl_node",
        "pg_auto_failover",
        Duration::from_secs(60),
    )?;

    let monitor = format!(
        "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover?sslmode=verify-full&sslrootcert={}",
        f.state.monitor_port,
        f.ca_cert().display()
    );
    let node_args = |name: &str, port: u16| -> Vec<String> {
        vec![
            "postgres".into(),
            "--name".into(),
            name.into(),
            "--pgport".into(),
            port.to_string(),
            "--pghost".into(),
            ha.join("sockets").display().to_string(),
            "--listen".into(),
            "127.0.0.1".into(),
            "--dbname".into(),
            APP_DB.into(),
            "--username".into(),
            APP_USER.into(),
            "--monitor".into(),
            monitor.clone(),
        ]
    };

    // The first node: our initdb, registered as the primary.
    initdb(f, NODES[0], NODE_HBA, &tunings.node_conf())?;
    autoctl_create(f, NODES[0], &node_args(NODES[0], p1))?;
    process::spawn_service(&f.run_as, &f.tools, &ha, NODES[0])?;
    let admin = wait_for_server(
        handle,
        &ha,
        p1,
        &f.run_as.name,
        "postgres",
        Duration::from_secs(60),
    )?;
    // Passwords go in as SQL over the socket, never on a command line; and
    // neither pg_stat_statements (which pg_autoctl loads) nor the server log,
    // should the statement fail, may keep its text.
    let quote = |s: &Secret| s.expose().replace('\'', "''");
    handle
        .block_on(admin.batch_execute(&format!(
            "SET pg_stat_statements.track_utility = off; SET log_min_error_statement = panic; \
             SET log_statement = 'none'; \
             ALTER ROLE {APP_USER} PASSWORD '{}'; ALTER ROLE {REPLICATOR} PASSWORD '{}'",
            quote(&f.state.password),
            quote(replication)
        )))
        .map_err(|e| {
            Error::Local(format!(
                "setting the passwords of {APP_USER} and {REPLICATOR}: {}",
                pg_error(&e)
            ))
        })?;
    drop(admin);

    // The second node: pg_autoctl clones the first (pg_basebackup), our
    // pg_hba.conf and railyard.conf included.
    autoctl_create(f, NODES[1], &node_args(NODES[1], p2))?;
    process::spawn_service(&f.run_as, &f.tools, &ha, NODES[1])?;
    handle.block_on(f.wait_stable(Duration::from_secs(120)))?;
    Ok(())
}
