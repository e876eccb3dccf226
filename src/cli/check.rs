//! `railyard check`: the ledger's invariants, and `--repair`.

use super::ledger_db;
use crate::app;

pub(crate) async fn check(repair: bool) -> Result<(), app::AppError> {
    let (db, _cluster) = ledger_db(None).await?;
    if repair {
        let r = app::check::repair(&db).await?;
        out!(
            "repair            positions {}, fills {}, statuses {} recomputed from trades; {} over-filled order(s) left (trades exceed the quantity)",
            r.positions,
            r.fills,
            r.statuses,
            r.overfilled
        );
    }
    let verdicts = app::check::check(&db).await?;
    print_verdicts(&verdicts);
    db.close(db.config().shutdown_deadline()).await;
    let failed: Vec<_> = verdicts
        .iter()
        .filter(|v| !v.passed())
        .map(|v| v.name)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(app::AppError::Failed(format!(
            "broken: {}",
            failed.join(", ")
        )))
    }
}

/// One line per invariant: pass or FAIL, its violations, what it means.
pub(crate) fn print_verdicts(verdicts: &[app::check::Verdict]) {
    for v in verdicts {
        out!(
            "{} {:<24} {:>6}  {}{}",
            if v.passed() { "pass" } else { "FAIL" },
            v.name,
            v.violations,
            v.meaning,
            if v.detail.is_empty() || (v.passed() && v.name != "money_conserved") {
                String::new()
            } else {
                format!(" [{}]", v.detail)
            }
        );
    }
}
