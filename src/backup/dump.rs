//! `pg_dump` of a database, or of some of its tables, in the custom format
//! (compressed; `pg_restore` reads it): the backup taken before a risky
//! migration when pgBackRest is not configured.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::backup::tool;
use crate::config::{ConnectTarget, Host, Secret};
use crate::error::Error;

/// A dump written.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Dump {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// How long `pg_dump` took.
    pub took: Duration,
}

/// Whether `name` can be given to `pg_dump --table` as a plain name
/// (`table` or `schema.table`: letters, digits, `_`, `$`, at most one dot).
pub(crate) fn valid_table(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && name.split('.').count() <= 2
        && name.split('.').all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        })
}

/// Dumps the database of `target` (only `tables` when not empty) into
/// `dir/<stem>.dump`, creating `dir` when missing. The password goes to
/// `pg_dump` in its environment (`PGPASSWORD`), never on its command line;
/// a partial file is removed when the dump fails.
///
/// `pg_dump --table` of a partitioned table dumps only its definition: give
/// its partitions as well (the migrator does, from `pg_partition_tree`).
pub async fn pg_dump(
    target: &ConnectTarget,
    dir: &Path,
    stem: &str,
    tables: &[String],
    deadline: Duration,
) -> Result<Dump, Error> {
    pg_dump_with(target, dir, stem, tables, &[], deadline).await
}

/// A `--table` pattern matching exactly this schema and name (quoted, so
/// neither case folding nor pattern characters apply).
fn exact_pattern(schema: &str, name: &str) -> String {
    format!(
        "\"{}\".\"{}\"",
        schema.replace('"', "\"\""),
        name.replace('"', "\"\"")
    )
}

/// [`pg_dump`] with more tables named exactly by `(schema, name)`, as the
/// catalogue spells them (the partitions of partitioned tables in
/// `tables`). Dumps the whole database only when both are empty.
pub(crate) async fn pg_dump_with(
    target: &ConnectTarget,
    dir: &Path,
    stem: &str,
    tables: &[String],
    exact: &[(String, String)],
    deadline: Duration,
) -> Result<Dump, Error> {
    let started = Instant::now();
    if let Some(bad) = tables.iter().find(|t| !valid_table(t)) {
        return Err(Error::Backup(format!(
            "table {:?}: not a plain table name (schema.table, letters, digits, _)",
            bad.chars().take(60).collect::<String>()
        )));
    }
    tokio::fs::create_dir_all(dir).await.map_err(|e| {
        Error::io(
            format!("creating the backup directory {}", dir.display()),
            e,
        )
    })?;
    let path = dir.join(format!("{stem}.dump"));
    let partial = dir.join(format!("{stem}.dump.partial"));
    let mut c = std::process::Command::new(tool::find_async("pg_dump").await?);
    c.args(["--format=custom", "--compress=6", "--no-password"]);
    if !tables.is_empty() || !exact.is_empty() {
        c.arg("--strict-names");
        for t in tables {
            c.arg(format!("--table={t}"));
        }
        for (schema, name) in exact {
            c.arg(format!("--table={}", exact_pattern(schema, name)));
        }
    }
    c.arg(format!("--file={}", partial.display()));
    libpq_env(&mut c, target);
    let secrets: Vec<&Secret> = target.password.iter().collect();
    let r = tool::run(
        c,
        "dumping the database before a risky migration",
        deadline,
        &secrets,
    )
    .await;
    if let Err(e) = r {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(e);
    }
    tokio::fs::rename(&partial, &path)
        .await
        .map_err(|e| Error::io(format!("renaming the dump to {}", path.display()), e))?;
    let bytes = tokio::fs::metadata(&path)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    Ok(Dump {
        path,
        bytes,
        took: started.elapsed(),
    })
}

/// Sets libpq's variables for `target` on a command, replacing any the
/// process has (a `PGSERVICE` of the caller must not redirect the dump).
pub(crate) fn libpq_env(c: &mut std::process::Command, target: &ConnectTarget) {
    for v in [
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGPASSFILE",
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGSSLMODE",
        "PGSSLROOTCERT",
        "PGOPTIONS",
    ] {
        c.env_remove(v);
    }
    let hosts: Vec<String> = target
        .hosts
        .iter()
        .map(|(h, _)| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(dir) => dir.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = target.hosts.iter().map(|(_, p)| p.to_string()).collect();
    c.env("PGHOST", hosts.join(","))
        .env("PGPORT", ports.join(","))
        .env("PGTARGETSESSIONATTRS", "read-write")
        .env("PGAPPNAME", "railyard-backup")
        .env("PGCONNECT_TIMEOUT", "10");
    if let Some(u) = &target.user {
        c.env("PGUSER", u);
    }
    if let Some(d) = &target.dbname {
        c.env("PGDATABASE", d);
    }
    if let Some(p) = &target.password {
        c.env("PGPASSWORD", p.expose());
    }
    if let Some(m) = target.params.ssl_mode {
        c.env("PGSSLMODE", m.as_str());
    }
    if let Some(r) = &target.params.ssl_root_cert {
        c.env("PGSSLROOTCERT", r);
    }
}

#[cfg(test)]
mod tests {
    use super::{exact_pattern, valid_table};

    #[test]
    fn exact_names_are_quoted() {
        assert_eq!(
            exact_pattern("public", "trades_2026_01"),
            r#""public"."trades_2026_01""#
        );
        assert_eq!(exact_pattern("a\"b", "C*"), r#""a""b"."C*""#);
    }

    #[test]
    fn table_names_are_plain() {
        assert!(valid_table("orders"));
        assert!(valid_table("public.orders"));
        assert!(!valid_table("a.b.c"));
        assert!(!valid_table("orders*"));
        assert!(!valid_table("x;drop"));
        assert!(!valid_table(""));
    }
}
