//! The retention job: a [`Retention`] run on its schedule inside the
//! application, and early when the live bytes pass the threshold.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use railyard::database::Database;

use super::{Retention, RetentionRun, record_storage};

struct JobState {
    last: Mutex<Option<Result<RetentionRun, String>>>,
    runs: AtomicU64,
    early: AtomicU64,
    wake: tokio::sync::Notify,
}

/// The retention job: runs a [`Retention`] on its schedule, and early when
/// the live bytes pass the threshold. Dropping the handle stops it;
/// [`RetentionJob::shutdown`] waits for a run in progress (bounded).
///
/// ```no_run
/// # async fn demo(db: railyard::Database, retention: railyard_ops::retain::Retention) {
/// use std::time::Duration;
/// let job = railyard_ops::retain::RetentionJob::spawn(db, retention);
/// // … serve …
/// job.shutdown(Duration::from_secs(5)).await;
/// # }
/// ```
pub struct RetentionJob {
    state: Arc<JobState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for RetentionJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetentionJob")
            .field("runs", &self.runs())
            .finish_non_exhaustive()
    }
}

impl RetentionJob {
    /// Starts the job on the current runtime: a run at once, then every
    /// [`RetentionConfig::every`](super::RetentionConfig::every); sizes
    /// measured every
    /// [`RetentionConfig::check_every`](super::RetentionConfig::check_every),
    /// with an early run when the live bytes are over the threshold (unless
    /// the last run already found it could not free enough).
    pub fn spawn(db: Database, retention: Retention) -> Self {
        let state = Arc::new(JobState {
            last: Mutex::new(None),
            runs: AtomicU64::new(0),
            early: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
        });
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let s = state.clone();
        let task = tokio::spawn(async move {
            let config = retention.config.clone();
            let mut next_run = tokio::time::Instant::now();
            let mut cannot_free = false;
            loop {
                let next_check = tokio::time::Instant::now() + config.check_every;
                let forced = tokio::select! {
                    _ = &mut stopped => break,
                    () = s.wake.notified() => true,
                    () = tokio::time::sleep_until(next_run.min(next_check)) => false,
                };
                let now = tokio::time::Instant::now();
                let mut due = forced || now >= next_run;
                if !due {
                    match retention.measure(&db).await {
                        Ok(mut f) => {
                            f.cannot_free = cannot_free && f.over_threshold();
                            let over = f.over_threshold();
                            record_storage(&db, f);
                            if over && !cannot_free {
                                tracing::info!(
                                    "retention: live history over its size threshold; running early"
                                );
                                s.early.fetch_add(1, Ordering::Relaxed);
                                due = true;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "retention: cannot measure sizes"),
                    }
                }
                if !due {
                    continue;
                }
                let outcome = retention.run(&db, false).await;
                match &outcome {
                    Ok(r) if r.skipped.is_none() => cannot_free = r.after.cannot_free,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "retention: run failed; the next run tries again")
                    }
                }
                // The report first, then the count: whoever sees `runs`
                // change finds this run's report in `last_run`.
                *s.last.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(outcome.map_err(|e| e.to_string()));
                s.runs.fetch_add(1, Ordering::Release);
                next_run = tokio::time::Instant::now() + config.every;
            }
        });
        RetentionJob {
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Asks for a run now (it starts when the current one, if any, ends).
    pub fn run_now(&self) {
        self.state.wake.notify_one();
    }

    /// Runs finished (done, skipped or failed).
    pub fn runs(&self) -> u64 {
        AtomicU64::load(&self.state.runs, Ordering::Acquire)
    }

    /// Runs started early because the live bytes were over the threshold.
    pub fn early_runs(&self) -> u64 {
        AtomicU64::load(&self.state.early, Ordering::Relaxed)
    }

    /// The last run's report, or its error.
    pub fn last_run(&self) -> Option<Result<RetentionRun, String>> {
        self.state
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops the job, waiting at most `within` for a run in progress (then
    /// aborting it: its transaction rolls back with its connection).
    pub async fn shutdown(mut self, within: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(within, &mut task).await.is_err()
        {
            task.abort();
        }
    }
}

impl Drop for RetentionJob {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
