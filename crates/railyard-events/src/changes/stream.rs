//! The consumer's end of a change stream: [`ChangeStream`], and the
//! acknowledgements it passes to the reader.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use super::board::Slots;
use super::{ChangeEvent, ResumeToken};
use crate::error::Error;

#[derive(Debug, Default)]
pub(super) struct Acks {
    /// The furthest token acknowledged.
    pub(super) upto: Mutex<Option<ResumeToken>>,
    pub(super) notify: tokio::sync::Notify,
}

/// A stream of [`ChangeEvent`]s (see [`DatabaseEvents::changes`](crate::DatabaseEvents::changes)).
#[derive(Debug)]
pub struct ChangeStream {
    pub(super) rx: tokio::sync::mpsc::Receiver<Result<ChangeEvent, Error>>,
    pub(super) acks: Arc<Acks>,
    pub(super) slot: String,
    pub(super) slots: Slots,
    pub(super) task: tokio::task::JoinHandle<()>,
}

impl Drop for ChangeStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ChangeStream {
    /// The next event; `None` when the stream ended (after an error item).
    pub async fn next(&mut self) -> Option<Result<ChangeEvent, Error>> {
        self.rx.recv().await
    }

    /// Acknowledges every event up to `token`: the slot moves past every
    /// transaction wholly acknowledged (asynchronously), whose changes are
    /// then never delivered again.
    pub fn ack(&self, token: &ResumeToken) {
        let mut upto = self.acks.upto.lock().unwrap_or_else(|p| p.into_inner());
        if upto.is_none_or(|u| *token > u) {
            *upto = Some(*token);
            drop(upto);
            self.acks.notify.notify_one();
        }
    }

    /// The WAL the slot retains on the primary, as last measured.
    pub fn retained_bytes(&self) -> Option<u64> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.slot)
            .and_then(|f| f.retained_bytes)
    }
}

impl futures_util::Stream for ChangeStream {
    type Item = Result<ChangeEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}
