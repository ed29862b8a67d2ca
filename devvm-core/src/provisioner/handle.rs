//! Cancel tokens, and runs going on in the background with their own event stream.

use super::*;

/// Cancels a run from another task or thread. Cheap to clone.
///
/// A cancelled run stops at once (the step under way is abandoned), rolls back what it
/// did, and fails with [`ErrorKind::Cancelled`].
#[derive(Debug, Clone)]
pub struct CancelToken {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for CancelToken {
    fn default() -> Self {
        Self::new()
    }
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        CancelToken {
            tx: Arc::new(watch::channel(false).0),
        }
    }
    /// Cancels every run holding this token.
    pub fn cancel(&self) {
        self.tx.send_replace(true);
    }
    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        *self.tx.borrow()
    }
    pub(super) async fn cancelled(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so this only returns once cancelled.
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// A run going on in the background ([`Provisioner::start_provision`],
/// [`Provisioner::start_deprovision`]): its events, in order, then its result.
///
/// The run goes on to its end (or rollback) even if the handle is dropped.
#[derive(Debug)]
pub struct RunHandle<T> {
    /// This run's events only (the bus filters them), so other runs cannot crowd them out.
    pub(super) events: Subscription,
    pub(super) task: Option<tokio::task::JoinHandle<Result<T>>>,
    pub(super) result: Option<Result<T>>,
}

impl<T: Send + 'static> RunHandle<T> {
    /// The run's next event; `None` once the run has ended and every one of its events
    /// was delivered. Cancel-safe: it can be raced in `tokio::select!`. A caller that falls
    /// more than the event buffer behind gets [`EventKind::Lagged`](crate::EventKind::Lagged)
    /// and then the newest events (the last one still says how the run ended).
    pub async fn next_event(&mut self) -> Option<crate::events::Event> {
        loop {
            let Some(task) = self.task.as_mut() else {
                // Every event of the run was published before its task ended.
                return self.events.try_recv();
            };
            tokio::select! {
                biased;
                Some(e) = self.events.recv() => return Some(e),
                joined = task => {
                    self.result = Some(joined.unwrap_or_else(|e| {
                        Err(Error::backend("the run's task failed").with_source(e))
                    }));
                    self.task = None;
                }
            }
        }
    }

    /// Waits for the run to end and returns its result; events not yet taken are dropped.
    pub async fn finish(mut self) -> Result<T> {
        while self.next_event().await.is_some() {}
        self.result
            .take()
            .unwrap_or_else(|| Err(Error::backend("the run ended without a result")))
    }
}
