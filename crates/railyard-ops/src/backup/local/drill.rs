//! The restore drill: a backup restored into a scratch instance, recovered
//! to its counted restore point, promoted, checked (the application's checks
//! and every table's rows), then removed.

use std::time::Instant;

use super::points::TABLES_SQL;
use super::{
    CheckOutcome, Checks, CountedPoint, DrillReport, LocalBackups, NOT_VERIFIED, Phase,
    QUERY_DEADLINE, Scratch, within,
};
use crate::backup::pgbackrest::RestoreTarget;
use crate::error::Error;

impl LocalBackups {
    /// A restore drill: restores a backup (`set`, or the newest) into a
    /// scratch instance on a free loopback port, recovering to the backup's
    /// counted restore point (or, for a backup without one, to the end of
    /// the backup), promotes it, runs `checks` and compares every table's
    /// rows with the counts at the point, then stops and removes the
    /// instance (also when a phase fails). A backup without a counted point
    /// (one taken before a risky migration, or whose point failed) is
    /// restored and checked, but its report fails with [`NOT_VERIFIED`]:
    /// without the counts nothing says the copy holds the right rows. Errors only when the drill cannot
    /// begin (backups not set up); a failed phase is in the report.
    pub async fn verify(&self, set: Option<&str>, checks: Checks) -> Result<DrillReport, Error> {
        self.require_enabled().await?;
        self.write_config().await?;
        let mut report = DrillReport {
            label: set.map(str::to_owned),
            target: String::new(),
            phases: Vec::new(),
            checks: Vec::new(),
            error: None,
        };
        let label = match set {
            Some(l) => Some(l.to_owned()),
            None => match self.pgbackrest().info().await {
                Ok(sets) => sets.last().map(|s| s.label.clone()),
                Err(e) => {
                    report.error = Some(format!("listing the backups: {e}"));
                    return Ok(report);
                }
            },
        };
        let Some(label) = label else {
            report.error = Some("the repository holds no backup; run `railyard backup run`".into());
            return Ok(report);
        };
        report.label = Some(label.clone());
        let point = self.point_of(&label).await;
        let target = match &point {
            Some(p) => RestoreTarget::Name(p.restore_point.clone()),
            None => RestoreTarget::Immediate,
        };
        report.target = match &point {
            Some(p) => format!("restore point {} at {}", p.restore_point, p.lsn),
            None => {
                "the end of the backup (no counted restore point recorded: rows cannot be compared)"
                    .into()
            }
        };
        let mut scratch = match self.scratch("drill").await {
            Ok(s) => s,
            Err(e) => {
                report.error = Some(e.to_string());
                return Ok(report);
            }
        };
        let outcome = self
            .drill_phases(
                &mut scratch,
                &label,
                &target,
                point.as_ref(),
                checks,
                &mut report,
            )
            .await;
        if let Err(e) = outcome {
            report.error = Some(e.to_string());
        }
        if point.is_none() && report.error.is_none() {
            // It restored and the application's checks held, but nothing
            // says which rows the copy should hold: no verdict of "passed".
            report.error = Some(NOT_VERIFIED.into());
        }
        let started = Instant::now();
        let down = scratch.remove().await;
        report.phases.push(Phase {
            name: "teardown",
            took: started.elapsed(),
            ok: down.is_ok(),
        });
        if let Err(e) = down
            && report.error.is_none()
        {
            report.error = Some(format!("teardown: {e}"));
        }
        Ok(report)
    }

    async fn drill_phases(
        &self,
        scratch: &mut Scratch,
        label: &str,
        target: &RestoreTarget,
        point: Option<&CountedPoint>,
        checks: Checks,
        report: &mut DrillReport,
    ) -> Result<(), Error> {
        let timed = |name, started: Instant, ok| Phase {
            name,
            took: started.elapsed(),
            ok,
        };
        let started = Instant::now();
        let r = self
            .pgbackrest()
            .restore(&scratch.data, Some(label), target)
            .await;
        report.phases.push(timed("restore", started, r.is_ok()));
        r?;
        let started = Instant::now();
        let r = scratch.start().await;
        report
            .phases
            .push(timed("start/recovery", started, r.is_ok()));
        r?;
        let started = Instant::now();
        let r = self.check_phase(scratch, point, checks).await;
        let ok = r.as_ref().is_ok_and(|c| c.iter().all(|c| c.passed));
        report.phases.push(timed("check", started, ok));
        report.checks = r?;
        Ok(())
    }

    async fn check_phase(
        &self,
        scratch: &Scratch,
        point: Option<&CountedPoint>,
        checks: Checks,
    ) -> Result<Vec<CheckOutcome>, Error> {
        let mut out = checks(scratch.config(&self.database)).await?;
        if let Some(point) = point {
            let client = scratch.client(&point.database).await?;
            within(
                "SET statement_timeout",
                client.batch_execute(&format!(
                    "SET statement_timeout = '{}ms'",
                    QUERY_DEADLINE.as_millis() - 5000
                )),
            )
            .await?;
            let tables: Vec<String> =
                within("listing the restored tables", client.query(TABLES_SQL, &[]))
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
            for (t, expected) in &point.counts {
                let seen = if tables.contains(t) {
                    within(
                        "counting",
                        client.query_one(&format!("SELECT count(*) FROM {t}"), &[]),
                    )
                    .await
                    .map(|r| r.get::<_, i64>(0))
                    .ok()
                } else {
                    None
                };
                out.push(CheckOutcome::new(
                    format!("rows {t}"),
                    seen == Some(*expected),
                    match seen {
                        Some(n) => format!("{n} restored, {expected} at the restore point"),
                        None => format!("missing from the copy; {expected} at the restore point"),
                    },
                ));
            }
            for t in tables.iter().filter(|t| !point.counts.contains_key(*t)) {
                out.push(CheckOutcome::new(
                    format!("rows {t}"),
                    false,
                    "in the copy but not at the restore point",
                ));
            }
        }
        Ok(out)
    }
}
