//! `railyard listen`, `notify` and `changes`: notifications and row changes
//! as JSON lines.

use railyard::Database;
use railyard_events::DatabaseEvents;

use super::{StopSignals, config};
use crate::app;

pub(crate) async fn changes(
    tables: Vec<String>,
    slot: String,
    from: Option<String>,
    drop_slot: bool,
) -> Result<(), app::AppError> {
    use std::io::Write;
    let (config, _cluster) = config().await?;
    let db = Database::connect(config.pool_max_size(1)).await?;
    if drop_slot {
        let existed = db.drop_change_slot(&slot).await?;
        eprintln!(
            "slot {slot} {}",
            if existed { "dropped" } else { "did not exist" }
        );
        db.close(std::time::Duration::from_secs(2)).await;
        return Ok(());
    }
    let mut cfg = railyard_events::ChangeStreamConfig::new(&slot, tables);
    if let Some(t) = from {
        cfg = cfg.from(t.parse()?);
    }
    let mut stream = db.changes(cfg).await?;
    let mut signals = StopSignals::new()?;
    let result = loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = signals.next() => None,
        };
        let event = match event {
            None => break Ok(()),
            Some(Err(e)) => break Err(e),
            Some(Ok(e)) => e,
        };
        let line = serde_json::to_string(&event).unwrap_or_default();
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break Ok(());
        }
        // Printed: handled, as far as this command goes.
        stream.ack(&event.token);
    };
    drop(stream);
    db.close(std::time::Duration::from_secs(2)).await;
    result.map_err(Into::into)
}

pub(crate) async fn listen(channels: Vec<String>) -> Result<(), app::AppError> {
    use std::io::Write;
    let (config, _cluster) = config().await?;
    let db = Database::connect(config.pool_max_size(1)).await?;
    let mut listener = db.listen(channels).await?;
    let mut signals = StopSignals::new()?;
    loop {
        let event = tokio::select! {
            e = listener.next() => e,
            _ = signals.next() => None,
        };
        let Some(event) = event else { break };
        let line = serde_json::to_string(&event).unwrap_or_default();
        let mut out = std::io::stdout().lock();
        // A closed pipe (`railyard listen … | head`) ends the command.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    drop(listener);
    db.close(std::time::Duration::from_secs(2)).await;
    Ok(())
}

pub(crate) async fn notify(channel: String, payload: String) -> Result<(), app::AppError> {
    let (config, _cluster) = config().await?;
    let db = Database::connect(config.pool_max_size(1)).await?;
    db.notify(&channel, &payload).await?;
    db.close(std::time::Duration::from_secs(2)).await;
    Ok(())
}
