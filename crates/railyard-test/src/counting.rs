//! Counting what a test ran on its connection: [`assert_max_queries`],
//! [`count_queries`] and the [`assert_max_queries!`](macro@crate::assert_max_queries) macro.

use super::*;

/// Runs `work` and fails the test when it ran more than `max` statements on
/// the test's connection, listing them (literals replaced by `?`; transaction
/// control and `SET` are not counted). Returns `work`'s value. The
/// [`assert_max_queries!`](macro@crate::assert_max_queries) macro wraps it.
///
/// ```no_run
/// use diesel_async::RunQueryDsl;
/// # async fn demo(db: railyard::Database) -> Result<(), railyard::Error> {
/// let n = railyard_test::assert_max_queries(&db, 1, async {
///     db.read(async |conn| {
///         diesel::sql_query("SELECT 1").execute(conn).await.map_err(railyard::Error::from)
///     })
///     .await
/// })
/// .await?;
/// # Ok(()) }
/// ```
///
/// # Panics
/// When more than `max` statements ran, and when `db` is not the `Database`
/// a `#[railyard_test::test]` receives.
pub async fn assert_max_queries<T>(
    db: &Database,
    max: usize,
    work: impl std::future::Future<Output = T>,
) -> T {
    let (value, statements, total) = count_queries(db, work).await;
    if total > max {
        let listed: Vec<String> = statements
            .iter()
            .enumerate()
            .map(|(i, s)| format!("  {:>3}. {s}", i + 1))
            .collect();
        panic!(
            "{total} statements ran where at most {max} were allowed:\n{}{}",
            listed.join("\n"),
            if total > statements.len() {
                format!("\n  … and {} more", total - statements.len())
            } else {
                String::new()
            }
        );
    }
    value
}

/// Runs `work` and returns its value, the statements it ran on the test's
/// connection (literals replaced by `?`; at most 1,000 kept) and how many ran.
///
/// # Panics
/// When `db` is not the `Database` a `#[railyard_test::test]` receives.
pub async fn count_queries<T>(
    db: &Database,
    work: impl std::future::Future<Output = T>,
) -> (T, Vec<String>, usize) {
    let labels = pinned::Pinned::of(db).and_then(|p| p.labels()).expect(
        "count_queries and assert_max_queries need the Database a #[railyard_test::test] receives",
    );
    labels.recording.arm();
    let value = work.await;
    let (statements, total) = labels.recording.disarm();
    (value, statements, total)
}

/// Fails the test when the block runs more than `max` statements on the
/// test's connection, listing them; evaluates to the block's value. See
/// [`assert_max_queries`](fn@crate::assert_max_queries).
///
/// ```no_run
/// # async fn demo(db: railyard::Database) {
/// railyard_test::assert_max_queries!(db, 2, {
///     // … the code under test
/// });
/// # }
/// ```
#[macro_export]
macro_rules! assert_max_queries {
    ($db:expr, $max:expr, $body:block) => {
        $crate::assert_max_queries(&$db, $max, async { $body }).await
    };
}
