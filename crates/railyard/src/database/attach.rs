//! The seam product crates attach through: state that belongs to a
//! [`Database`](super::Database) (a change stream's slots, a retention job's
//! storage figures) without the core knowing its type. Each attachment is
//! one value per type, made on first use; `Database::health` and
//! `Database::metrics_text` ask every attachment for its part.

use std::any::{Any, TypeId};
use std::sync::{Arc, Mutex};

use crate::observe::StorageFigures;
use crate::observe::health::HealthCheck;

/// State a product crate keeps on a [`Database`](super::Database), reached
/// with [`Database::attachment`](super::Database::attachment).
pub trait Attachment: Any + Send + Sync {
    /// Checks `Database::health` adds (none by default).
    fn health_checks(&self) -> Vec<HealthCheck> {
        Vec::new()
    }

    /// Prometheus text `Database::metrics_text` appends (none by default).
    fn metrics_text(&self, _out: &mut String) {}

    /// Storage figures that replace the core's own measurement (none by
    /// default): a retention job's carry its threshold and verdict.
    fn storage(&self) -> Option<StorageFigures> {
        None
    }
}

type Entry = (TypeId, Arc<dyn Attachment>, Arc<dyn Any + Send + Sync>);

/// One attachment per type. Bounded by the number of attachment types the
/// program links (a handful): entries are never made from input.
#[derive(Default)]
pub(crate) struct Attachments(Mutex<Vec<Entry>>);

impl Attachments {
    pub(crate) fn get_or_default<T: Attachment + Default>(&self) -> Arc<T> {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let id = TypeId::of::<T>();
        if let Some((_, _, any)) = all.iter().find(|(t, _, _)| *t == id) {
            return Arc::clone(any)
                .downcast::<T>()
                .expect("an attachment is stored under its own type's id");
        }
        let made = Arc::new(T::default());
        all.push((id, made.clone(), made.clone()));
        made
    }

    pub(crate) fn each(&self) -> Vec<Arc<dyn Attachment>> {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().map(|(_, a, _)| a.clone()).collect()
    }
}
