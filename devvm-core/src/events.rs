//! Typed progress events, delivered to any number of subscribers while a run goes on.
//!
//! Every event of one run carries the run's request id and a sequence number that grows
//! by one per event, so a subscriber can tell whether it missed anything. Subscribers get
//! every event published after they subscribed, in order; a slow subscriber never slows
//! the run (events queue for it) and a dropped subscriber is forgotten.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::mpsc;

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

/// Fans events out to subscribers.
#[derive(Debug, Clone, Default)]
pub(crate) struct EventBus {
    subscribers: Arc<Mutex<Vec<mpsc::UnboundedSender<Event>>>>,
}

impl EventBus {
    pub(crate) fn subscribe(&self) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().push(tx);
        Subscription { rx }
    }

    pub(crate) fn publish(&self, event: Event) {
        let mut subs = self.lock();
        subs.retain(|tx| tx.send(event.clone()).is_ok());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<mpsc::UnboundedSender<Event>>> {
        // A panic while holding this lock cannot leave the vector inconsistent.
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A stream of events, from [`Provisioner::subscribe`](crate::Provisioner::subscribe).
///
/// Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Subscription {
    /// The next event; `None` once the provisioner is gone and every event was read.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is waiting, without blocking.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// Every event waiting now, without blocking.
    pub fn drain(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.try_recv()).collect()
    }

    /// Whether the provisioner is gone (no event will ever arrive again once the
    /// queued ones are read).
    pub fn is_closed(&self) -> bool {
        self.rx.is_closed()
    }

    /// The next event, blocking the thread. Must not be called from async code.
    pub fn blocking_recv(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
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
