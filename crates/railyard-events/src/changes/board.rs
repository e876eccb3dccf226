//! The change streams' slots as the handle's health and metrics show them:
//! what each stream last measured of its slot.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use railyard::Database;
use railyard::database::Attachment;
use railyard::observe::HealthCheck;

/// What the stream last measured of its slot (shared with the handle's
/// health and metrics).
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotFigures {
    pub(crate) retained_bytes: Option<u64>,
    pub(crate) limit: u64,
    pub(crate) lost: bool,
}

pub(crate) type Slots = Arc<Mutex<BTreeMap<String, SlotFigures>>>;

/// The change streams' slots of one handle, shown by its health and metrics.
#[derive(Default)]
pub(crate) struct SlotBoard(Slots);

impl SlotBoard {
    pub(super) fn of(db: &Database) -> Slots {
        db.attachment::<SlotBoard>().0.clone()
    }
}

impl Attachment for SlotBoard {
    fn health_checks(&self) -> Vec<HealthCheck> {
        let slots = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .map(|(name, f)| railyard::observe::slot(name, f.retained_bytes, f.limit, f.lost))
            .collect()
    }

    fn metrics_text(&self, out: &mut String) {
        let slots = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slots.is_empty() {
            return;
        }
        out.push_str("# HELP railyard_slot_retained_bytes WAL a change stream's slot keeps on the primary.\n# TYPE railyard_slot_retained_bytes gauge\n");
        for (name, f) in slots.iter() {
            if let Some(b) = f.retained_bytes {
                out.push_str(&format!(
                    "railyard_slot_retained_bytes{{slot=\"{name}\"}} {b}\n"
                ));
            }
        }
    }
}
