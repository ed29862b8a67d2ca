//! Blocking work that a cancelled or timed-out step cannot orphan.
//!
//! The pipeline abandons a step that is cancelled or runs out of time, but a blocking
//! call (libvirt's define, a disk's final link) already handed to a thread cannot be
//! stopped: it would finish after the rollback had passed it, and leave a resource
//! behind. So every step's blocking work goes through [`blocking`], which the pipeline
//! tracks per step:
//!
//! * the rollback of an abandoned step first **waits for its blocking work to end**, and
//!   only then undoes the step, so whatever that work made is undone too;
//! * the blocking work itself can ask [`abandoned`] right before it commits something
//!   (defines a domain, links a disk into place) and stop instead.
//!
//! A backend that runs blocking code of its own must use [`blocking`] for it; outside a
//! pipeline step it is a plain `spawn_blocking`.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::{Error, ErrorKind, Result};

/// The blocking work of one step: how much is running, and whether the step was given up.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepWork(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    running: AtomicUsize,
    abandoned: AtomicBool,
    idle: Notify,
}

tokio::task_local! {
    static CURRENT: StepWork;
}

thread_local! {
    static THREAD: RefCell<Option<StepWork>> = const { RefCell::new(None) };
}

/// Counts one piece of blocking work while it lives.
struct Running(StepWork);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.0.idle.notify_waiters();
        }
    }
}

impl StepWork {
    /// Runs `fut` (a step's backend call) with this tracker as its current step.
    pub(crate) async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        CURRENT.scope(self, fut).await
    }

    /// Marks the step as given up: blocking work asking [`abandoned`] stops.
    pub(crate) fn abandon(&self) {
        self.0.abandoned.store(true, Ordering::SeqCst);
    }

    /// Whether the step was given up (see [`abandon`](Self::abandon)).
    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    pub(crate) fn is_abandoned(&self) -> bool {
        self.0.abandoned.load(Ordering::SeqCst)
    }

    /// Whether some blocking work of this step is running now.
    pub(crate) fn busy(&self) -> bool {
        self.0.running.load(Ordering::SeqCst) > 0
    }

    /// Waits until no blocking work of this step runs, at most `limit`. False if some is
    /// still running then.
    pub(crate) async fn settle(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let idle = self.0.idle.notified();
                if self.0.running.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

/// Runs blocking `f` on tokio's blocking pool, tracked by the pipeline step that called
/// it (see the [module docs](self)). Returns `f`'s result; a panic in `f` is a
/// [`ErrorKind::Backend`] error.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let running = CURRENT.try_with(|w| {
        w.0.running.fetch_add(1, Ordering::SeqCst);
        Running(w.clone())
    });
    let handle = tokio::task::spawn_blocking(move || {
        let step = running.as_ref().ok().map(|r| r.0.clone());
        THREAD.with(|t| *t.borrow_mut() = step);
        let out = f();
        THREAD.with(|t| *t.borrow_mut() = None);
        drop(running);
        out
    });
    handle
        .await
        .map_err(|e| Error::backend("blocking task failed").with_source(e))?
}

/// Inside [`blocking`] work: whether the step it belongs to was cancelled or timed out.
/// Call it right before committing something and return [`cancelled_before_commit`]
/// instead when it is true. Always false outside a pipeline step.
pub fn abandoned() -> bool {
    THREAD.with(|t| {
        t.borrow()
            .as_ref()
            .is_some_and(|w| w.0.abandoned.load(Ordering::SeqCst))
    })
}

/// Inside [`blocking`] work: the step it belongs to, for a thread of its own that must
/// watch for [`abandoned`] (a long libvirt job it can abort). None outside a step.
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub(crate) fn current() -> Option<StepWork> {
    THREAD.with(|t| t.borrow().clone())
}

/// The error blocking work returns when it stops because its step was abandoned.
pub fn cancelled_before_commit(what: &str) -> Error {
    Error::new(
        ErrorKind::Cancelled,
        format!("the step was abandoned before {what}"),
    )
}
