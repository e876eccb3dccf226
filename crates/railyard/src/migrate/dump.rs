//! `pg_dump` of a database, or of some of its tables, in the custom format
//! (compressed; `pg_restore` reads it): the backup taken before a risky
//! migration when pgBackRest is not configured.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{ConnectTarget, Host, Secret};
use crate::error::Error;
use crate::migrate::tool;

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

/// `time` in UTC as `YYYYMMDDTHHMMSS.mmmZ`, the stamp in a dump's file name
/// (sorts by time; no calendar crate for one format).
pub(crate) fn utc_stamp(time: std::time::SystemTime) -> String {
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01: shift to eras of
/// 400 years starting on March 1st, where every era has the same length.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod stamp_tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn stamps_are_utc_calendar_times() {
        let at = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_millis(s * 1000 + ms);
        assert_eq!(utc_stamp(at(0, 0)), "19700101T000000.000Z");
        assert_eq!(utc_stamp(at(951_782_400, 5)), "20000229T000000.005Z");
        assert_eq!(
            utc_stamp(at(1_796_601_600 + 3_723, 999)),
            "20261207T010203.999Z"
        );
        assert_eq!(utc_stamp(at(4_102_444_799, 0)), "20991231T235959.000Z");
        assert_eq!(utc_stamp(at(4_107_542_399, 0)), "21000228T235959.000Z");
    }

    proptest::proptest! {
        #[test]
        fn days_round_trip_through_the_calendar(days in 0i64..200_000) {
            let (y, m, d) = civil_from_days(days);
            // Days from civil, the inverse, counted the slow way.
            let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let mut n: i64 = (1970..y).map(|y| if leap(y) { 366 } else { 365 }).sum();
            let len = [31, if leap(y) { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
            n += len[..(m - 1) as usize].iter().sum::<i64>() + i64::from(d) - 1;
            proptest::prop_assert_eq!(n, days);
        }
    }
}
