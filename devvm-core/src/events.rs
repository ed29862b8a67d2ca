//! Typed progress events, delivered to any number of subscribers while a run goes on.
//!
//! Every event of one run carries the run's request id and a sequence number that grows
//! by one per event, so a subscriber can tell whether it missed anything. Subscribers get
//! the events published after they subscribed, in order; a slow subscriber never slows
//! the run. Each subscriber's queue is bounded: one that falls behind by more than its
//! buffer loses the oldest events and is told so by an [`EventKind::Lagged`] event, so a
//! reader that stops reading costs a fixed amount of memory. A dropped subscriber is
//! forgotten.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::Notify;

use crate::error::{ErrorInfo, UndoFailure};
use crate::types::{RequestId, Step, Vm, VmName};

/// One progress event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The run this event belongs to.
    pub request_id: RequestId,
    /// The VM the run is about.
    pub vm: VmName,
    /// Position of this event within its run, from 0.
    pub seq: u64,
    /// When it happened.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Which operation a run performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Creating a VM.
    Provision,
    /// Removing a VM.
    Deprovision,
    /// Cleaning up after a crashed run.
    Recover,
    /// Moving a running VM to another host.
    Migrate,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// A run began.
    RunStarted {
        /// What the run does.
        operation: Operation,
    },
    /// A step began.
    StepStarted {
        /// The step.
        step: Step,
    },
    /// A step reported progress.
    StepProgress {
        /// The step.
        step: Step,
        /// A human-readable line (a download percentage, a line of chef-client output).
        message: String,
        /// Fraction done in `0.0..=1.0`, when the step knows it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fraction: Option<f64>,
    },
    /// A step finished.
    StepFinished {
        /// The step.
        step: Step,
        /// A one-line summary of its result (`10.0.0.7`, `web-1.lab.example`).
        summary: String,
        /// Its result as JSON.
        result: serde_json::Value,
    },
    /// A step failed.
    StepFailed {
        /// The step.
        step: Step,
        /// Why.
        error: ErrorInfo,
    },
    /// A step's effect was undone (during rollback, deprovision or recovery).
    StepUndone {
        /// The step.
        step: Step,
    },
    /// Undoing a step failed; the resource is still held.
    UndoFailed {
        /// What is still held.
        failure: UndoFailure,
    },
    /// An undo found a resource of this VM's name that the run did not make (another
    /// request's, or one made by hand) and left it alone. Not a failure: the step counts
    /// as undone.
    LeftAlone {
        /// The step.
        step: Step,
        /// What was left alone (`domain web-1 on qemu:///system`).
        resource: String,
        /// Who holds it, as far as the backend can tell.
        holder: String,
    },
    /// Something the caller should fix, that did not stop the run (a secret file that
    /// other users may read).
    Warning {
        /// What and how to fix it.
        message: String,
    },
    /// The run finished.
    RunFinished {
        /// The VM, for a provision; `None` for a deprovision or recovery. (Named apart
        /// from [`Event::vm`], the VM's name, so the flattened JSON has one `vm` key.)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        provisioned: Option<Box<Vm>>,
    },
    /// The run failed (after rolling back whatever it could).
    RunFailed {
        /// Why.
        error: ErrorInfo,
    },
    /// This subscriber fell behind and `missed` events were dropped from its queue (the
    /// oldest ones). Not published by a run: each subscriber gets its own, as its next
    /// read after the loss. The event's `request_id`, `vm` and `seq` are those of the
    /// newest event missed; the events read next are the ones that followed it.
    Lagged {
        /// How many events were dropped.
        missed: u64,
    },
}

impl EventKind {
    /// The step the event is about, if any.
    pub fn step(&self) -> Option<Step> {
        match self {
            EventKind::StepStarted { step }
            | EventKind::StepProgress { step, .. }
            | EventKind::StepFinished { step, .. }
            | EventKind::StepFailed { step, .. }
            | EventKind::StepUndone { step } => Some(*step),
            EventKind::UndoFailed { failure } => Some(failure.step),
            EventKind::LeftAlone { step, .. } => Some(*step),
            _ => None,
        }
    }

    /// Whether this event ends its run.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            EventKind::RunFinished { .. } | EventKind::RunFailed { .. }
        )
    }
}

/// How many events a subscription holds for a reader that has not taken them yet, unless
/// [`ProvisionerBuilder::event_buffer`](crate::ProvisionerBuilder::event_buffer) says
/// otherwise.
pub const DEFAULT_EVENT_BUFFER: usize = 1024;

/// Which events a subscription receives.
#[derive(Debug, Clone)]
pub(crate) enum Only {
    All,
    Request(RequestId),
    Vm(VmName),
}

impl Only {
    fn matches(&self, e: &Event) -> bool {
        match self {
            Only::All => true,
            Only::Request(id) => e.request_id == *id,
            Only::Vm(vm) => e.vm == *vm,
        }
    }
}

/// What a subscription holds: at most `capacity` events, and how many older ones it
/// dropped to stay within that.
#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<Event>,
    /// Events dropped since the reader last took one, and the newest of them.
    missed: u64,
    newest_missed: Option<(RequestId, VmName, u64)>,
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes an async reader.
    notify: Notify,
    /// Wakes a blocking reader.
    ready: Condvar,
    only: Only,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Every update of the queue is one push or pop: a panic cannot leave it torn.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next thing a reader gets: the lag notice first, then the oldest event kept.
    /// `Err(())` when nothing is waiting and nothing will come.
    fn take(q: &mut Queue) -> Result<Option<Event>, ()> {
        if q.missed > 0 {
            let missed = std::mem::take(&mut q.missed);
            if let Some((request_id, vm, seq)) = q.newest_missed.take() {
                return Ok(Some(Event {
                    request_id,
                    vm,
                    seq,
                    at: OffsetDateTime::now_utc(),
                    kind: EventKind::Lagged { missed },
                }));
            }
        }
        match q.events.pop_front() {
            Some(e) => Ok(Some(e)),
            None if q.closed => Err(()),
            None => Ok(None),
        }
    }

    fn push(&self, event: &Event) {
        if !self.only.matches(event) {
            return;
        }
        {
            let mut q = self.lock();
            if q.events.len() >= self.capacity {
                // The reader is behind: the oldest event goes, so the newest (the one
                // that says how the run ended) is always there to read.
                if let Some(old) = q.events.pop_front() {
                    q.missed += 1;
                    q.newest_missed = Some((old.request_id, old.vm, old.seq));
                }
            }
            q.events.push_back(event.clone());
        }
        self.notify.notify_one();
        self.ready.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
        self.ready.notify_all();
    }
}

/// Fans events out to subscribers, each with a bounded queue of its own.
#[derive(Debug, Clone)]
pub(crate) struct EventBus {
    inner: Arc<BusInner>,
}

#[derive(Debug)]
struct BusInner {
    subscribers: Mutex<Vec<Arc<Shared>>>,
    capacity: usize,
}

impl Drop for BusInner {
    fn drop(&mut self) {
        let subs = self
            .subscribers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for s in subs.drain(..) {
            s.close();
        }
    }
}

impl Default for EventBus {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_EVENT_BUFFER)
    }
}

impl EventBus {
    /// A bus whose subscriptions hold at most `capacity` unread events (at least 1).
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        EventBus {
            inner: Arc::new(BusInner {
                subscribers: Mutex::new(Vec::new()),
                capacity: capacity.max(1),
            }),
        }
    }

    pub(crate) fn subscribe(&self) -> Subscription {
        self.subscribe_only(Only::All)
    }

    pub(crate) fn subscribe_only(&self, only: Only) -> Subscription {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
            ready: Condvar::new(),
            only,
            capacity: self.inner.capacity,
        });
        self.lock().push(Arc::clone(&shared));
        Subscription { shared }
    }

    pub(crate) fn publish(&self, event: Event) {
        let mut subs = self.lock();
        // A subscription only the bus still holds was dropped by its reader.
        subs.retain(|s| Arc::strong_count(s) > 1);
        for s in subs.iter() {
            s.push(&event);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Shared>>> {
        // A panic while holding this lock cannot leave the vector inconsistent.
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A stream of events, from [`Provisioner::subscribe`](crate::Provisioner::subscribe) or
/// inside a [`RunHandle`](crate::RunHandle).
///
/// It holds at most a fixed number of unread events
/// ([`DEFAULT_EVENT_BUFFER`] unless the provisioner was built with another). A reader that
/// falls further behind loses the oldest ones, never the newest, and its next read is an
/// [`EventKind::Lagged`] event saying how many it missed; then it goes on with the oldest
/// event still kept. Publishing never waits for a reader. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    shared: Arc<Shared>,
}

impl Subscription {
    /// The next event; `None` once the provisioner is gone and every event was read.
    /// Cancel-safe: nothing is lost if the future is dropped before it completes.
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match Shared::take(&mut self.shared.lock()) {
                Ok(Some(e)) => return Some(e),
                Err(()) => return None,
                Ok(None) => {}
            }
            notified.await;
        }
    }

    /// The next event if one is waiting, without blocking.
    pub fn try_recv(&mut self) -> Option<Event> {
        Shared::take(&mut self.shared.lock()).ok().flatten()
    }

    /// Every event waiting now, without blocking.
    pub fn drain(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.try_recv()).collect()
    }

    /// Whether the provisioner is gone (no event will ever arrive again once the
    /// queued ones are read).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// How many events wait to be read now (never more than the buffer's size).
    pub fn len(&self) -> usize {
        self.shared.lock().events.len()
    }

    /// Whether no event waits to be read now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next event, blocking the thread. Must not be called from async code.
    pub fn blocking_recv(&mut self) -> Option<Event> {
        let mut q = self.shared.lock();
        loop {
            match Shared::take(&mut q) {
                Ok(Some(e)) => return Some(e),
                Err(()) => return None,
                Ok(None) => {}
            }
            q = self
                .shared
                .ready
                .wait(q)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// The emitter of one run: numbers events and publishes them.
#[derive(Debug, Clone)]
pub(crate) struct RunEvents {
    bus: EventBus,
    request_id: RequestId,
    vm: VmName,
    seq: Arc<Mutex<u64>>,
}

impl RunEvents {
    pub(crate) fn new(bus: EventBus, request_id: RequestId, vm: VmName) -> Self {
        RunEvents {
            bus,
            request_id,
            vm,
            seq: Arc::new(Mutex::new(0)),
        }
    }

    pub(crate) fn emit(&self, kind: EventKind) {
        // Numbering and publishing happen under one lock so that sequence order is
        // delivery order, even when two steps report at once.
        let mut seq = self
            .seq
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let event = Event {
            request_id: self.request_id.clone(),
            vm: self.vm.clone(),
            seq: *seq,
            at: OffsetDateTime::now_utc(),
            kind,
        };
        *seq += 1;
        tracing::debug!(request_id = %event.request_id, vm = %event.vm, event = ?event.kind, "devvm event");
        self.bus.publish(event);
    }

    pub(crate) fn progress(&self, step: Step) -> Progress {
        Progress {
            inner: Some((self.clone(), step)),
        }
    }
}

/// Handed to a step so it can report progress while it works.
///
/// Messages become [`EventKind::StepProgress`] events. They are shown to people and
/// stored in logs: never put a secret in one.
#[derive(Debug, Clone)]
pub struct Progress {
    inner: Option<(RunEvents, Step)>,
}

impl Progress {
    /// A progress handle that goes nowhere, for calling a backend outside a run.
    pub fn discard() -> Self {
        Progress { inner: None }
    }

    /// Reports a line of progress.
    pub fn message(&self, message: impl Into<String>) {
        if let Some((run, step)) = &self.inner {
            run.emit(EventKind::StepProgress {
                step: *step,
                message: message.into(),
                fraction: None,
            });
        }
    }

    /// Reports progress with the fraction done (clamped to `0.0..=1.0`).
    pub fn fraction(&self, message: impl Into<String>, fraction: f64) {
        if let Some((run, step)) = &self.inner {
            run.emit(EventKind::StepProgress {
                step: *step,
                message: message.into(),
                fraction: Some(fraction.clamp(0.0, 1.0)),
            });
        }
    }
}
