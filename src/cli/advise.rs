//! `railyard advise`: index advice from the statements every client ran.

use railyard::Database;

use super::config;
use crate::app;

pub(crate) async fn advise(
    migration: Option<String>,
    dir: std::path::PathBuf,
    min_cost_factor: f64,
    min_rows: u64,
    json: bool,
) -> Result<(), app::AppError> {
    let (config, _cluster) = config().await?;
    let db = Database::connect(config.pool_max_size(2).replica_pool_max_size(1)).await?;
    let advice = railyard_ops::advise::Advisor::new(&db)
        .min_cost_factor(min_cost_factor)
        .min_table_rows(min_rows)
        .run()
        .await?;
    if json {
        println!("{}", advice.to_json());
    } else {
        print!("{advice}");
    }
    if let Some(name) = migration {
        for path in advice.write_migrations(&dir, &name)? {
            eprintln!("wrote {}", path.display());
        }
    }
    db.close(std::time::Duration::from_secs(2)).await;
    Ok(())
}
