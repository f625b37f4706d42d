//! [`Watch`]: the receiving end of a watch, a std channel of [`WatchBatch`]es.
//!
//! A backend creates the pair with [`Watch::channel`], keeps the [`WatchSender`] in
//! the thread or task that follows changes, and hands the [`Watch`] to the caller.
//! Dropping the [`Watch`] tells the backend side to stop ([`WatchSender::is_closed`]);
//! a watch that fails sends one `Err` and ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use crate::{Event, Revision, StoreError};

/// Changes delivered together. `revision` is the store revision the backend had
/// seen when it sent them: every change up to it has been delivered, so a
/// consumer that restarts can watch again from `revision`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    pub revision: Revision,
    pub events: Vec<Event>,
}

type Item = Result<WatchBatch, StoreError>;

/// The consumer's end of a watch. Drop it to cancel the watch.
pub struct Watch {
    rx: mpsc::Receiver<Item>,
    closed: Arc<AtomicBool>,
    /// What the backend side needs alive for as long as the watch (a runtime).
    _holds: Option<Box<dyn Send>>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

/// The backend's end of a watch.
#[derive(Debug)]
pub struct WatchSender {
    tx: mpsc::Sender<Item>,
    closed: Arc<AtomicBool>,
}

impl Watch {
    /// A connected pair, for backends.
    pub fn channel() -> (WatchSender, Watch) {
        let (tx, rx) = mpsc::channel();
        let closed = Arc::new(AtomicBool::new(false));
        (
            WatchSender {
                tx,
                closed: closed.clone(),
            },
            Watch {
                rx,
                closed,
                _holds: None,
            },
        )
    }

    /// Keeps `resource` alive until the watch is dropped, so a watch outlives the
    /// store handle it came from (the etcd backend's runtime, for one).
    pub fn holding(mut self, resource: impl Send + 'static) -> Watch {
        self._holds = Some(Box::new(resource));
        self
    }

    /// Blocks for the next batch. An `Err` ends the watch.
    pub fn recv(&self) -> Result<WatchBatch, StoreError> {
        self.rx.recv().unwrap_or(Err(StoreError::WatchClosed))
    }

    /// The next batch, or `Ok(None)` if none came within `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<WatchBatch>, StoreError> {
        match self.rx.recv_timeout(timeout) {
            Ok(item) => item.map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(StoreError::WatchClosed),
        }
    }

    /// A batch if one is waiting, else `Ok(None)`.
    pub fn try_recv(&self) -> Result<Option<WatchBatch>, StoreError> {
        match self.rx.try_recv() {
            Ok(item) => item.map(Some),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(StoreError::WatchClosed),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

impl WatchSender {
    /// Sends a batch or the error that ends the watch; false once the consumer is gone.
    pub fn send(&self, item: Result<WatchBatch, StoreError>) -> bool {
        !self.is_closed() && self.tx.send(item).is_ok()
    }

    /// Whether the consumer dropped its [`Watch`]: stop following changes.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}
