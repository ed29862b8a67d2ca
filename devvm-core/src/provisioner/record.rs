//! The one place a run's transitions are recorded. Each transition writes the journal
//! first and then says the matching event, so a subscriber never hears of a step, an undo
//! or a run's end that `recover()` would not find in the journal.

use super::*;
use crate::journal::MigrationPhase;
use run::Summary;

/// Records the transitions of one run (a provision, a deprovision or a recovery).
pub(super) struct Recorder {
    inner: Arc<Inner>,
    id: RequestId,
    events: RunEvents,
}

impl Recorder {
    pub(super) fn new(inner: Arc<Inner>, id: RequestId, events: RunEvents) -> Self {
        Recorder { inner, id, events }
    }

    /// The progress reporter of `step`, for the backend call.
    pub(super) fn progress(&self, step: Step) -> Progress {
        self.events.progress(step)
    }

    /// `run_started` of a recovery, which has no journal write of its own (the claim is it).
    pub(super) fn recovery_started(&self) {
        self.events.emit(EventKind::RunStarted {
            operation: Operation::Recover,
        });
    }

    /// Journals the intent of `step` on `key` (what its undo would remove), then says
    /// `step_started`.
    pub(super) async fn step_started(&self, step: Step, key: &UndoKey) -> Result<()> {
        let (id, k) = (self.id.clone(), key.clone());
        self.inner.journal(move |j| j.intent(&id, step, &k)).await?;
        self.events.emit(EventKind::StepStarted { step });
        Ok(())
    }

    /// Journals `step`'s result, then says `step_finished` with it.
    pub(super) async fn step_finished<T: Serialize + Summary>(
        &self,
        step: Step,
        value: &T,
    ) -> Result<()> {
        let json = serde_json::to_value(value)
            .map_err(|e| Error::backend("cannot encode step result").with_source(e))?;
        let (id, j2) = (self.id.clone(), json.clone());
        self.inner.journal(move |j| j.done(&id, step, &j2)).await?;
        self.events.emit(EventKind::StepFinished {
            step,
            summary: value.summary(),
            result: json,
        });
        Ok(())
    }

    /// Says `step_failed`. The journal keeps the step's intent, which is what the
    /// rollback (or `recover()`) undoes.
    pub(super) fn step_failed(&self, step: Step, error: &Error) {
        self.events.emit(EventKind::StepFailed {
            step,
            error: error.info(),
        });
    }

    /// Says `left_alone`: the undo of `step` found `resource` held by `holder`.
    pub(super) fn left_alone(&self, step: Step, resource: String, holder: String) {
        tracing::warn!(%step, %resource, %holder, "left alone: not this run's");
        self.events.emit(EventKind::LeftAlone {
            step,
            resource,
            holder,
        });
    }

    /// Journals the outcome of `step`'s undo, then says `step_undone`, or `undo_failed`
    /// with the failure it returns (also when the journal write itself failed).
    pub(super) async fn undone(
        &self,
        step: Step,
        key: &UndoKey,
        outcome: Result<()>,
    ) -> Option<UndoFailure> {
        let info = outcome.as_ref().err().map(Error::info);
        let id = self.id.clone();
        let record = self
            .inner
            .journal(move |j| j.undone(&id, step, info.as_ref()))
            .await;
        match (outcome, record) {
            (Ok(()), Ok(())) => {
                self.events.emit(EventKind::StepUndone { step });
                None
            }
            (Err(e), _) | (Ok(()), Err(e)) => {
                let failure = UndoFailure {
                    step,
                    resource: resource(step, key),
                    error: e.to_string(),
                    kind: e.kind(),
                };
                self.undo_failed(&failure);
                Some(failure)
            }
        }
    }

    /// Says `undo_failed` for an undo that could not even start (its step's blocking work
    /// never ended); the journal keeps the step's intent for `recover()`.
    pub(super) fn undo_failed(&self, failure: &UndoFailure) {
        tracing::warn!(%failure, "undo failed");
        self.events.emit(EventKind::UndoFailed {
            failure: failure.clone(),
        });
    }

    /// Journals the run as done with `vm` active, then says `run_finished` with it.
    pub(super) async fn provisioned(&self, vm: &Vm) -> Result<()> {
        let (id, v) = (self.id.clone(), vm.clone());
        self.inner
            .journal(move |j| j.set_run(&id, RunState::Active, Some(&v), None))
            .await?;
        self.events.emit(EventKind::RunFinished {
            provisioned: Some(Box::new(vm.clone())),
        });
        Ok(())
    }

    /// Journals the run as ended in `state` with nothing held, then says `run_finished`.
    pub(super) async fn removed(&self, state: RunState) -> Result<()> {
        let id = self.id.clone();
        self.inner
            .journal(move |j| j.set_run(&id, state, None, None))
            .await?;
        self.events
            .emit(EventKind::RunFinished { provisioned: None });
        Ok(())
    }

    /// Journals the run as ended in `state` with `error`, then says `run_failed`. A
    /// journal that cannot be written is logged: the run's rows still say it is under way,
    /// so `recover()` finishes it.
    pub(super) async fn failed(&self, state: RunState, error: &Error) {
        let (id, info) = (self.id.clone(), error.info());
        if let Err(e) = self
            .inner
            .journal(move |j| j.set_run(&id, state, None, Some(&info)))
            .await
        {
            tracing::error!(error = %e, "cannot record the end of a failed run; recover() will finish it");
        }
        self.refused(error);
    }

    /// Says `run_failed` for a run that ends before the journal holds anything of it (or
    /// whose journal rows belong to another attempt).
    pub(super) fn refused(&self, error: &Error) {
        self.events.emit(EventKind::RunFailed {
            error: error.info(),
        });
    }

    /// Journals the start of a move of this run's VM from `from` to `to`.
    pub(super) async fn migration_started(&self, from: &HostId, to: &HostId) -> Result<()> {
        let (id, f, t) = (self.id.clone(), from.clone(), to.clone());
        self.inner
            .journal(move |j| j.begin_migration(&id, &f, &t))
            .await
    }

    /// Journals that the move enters `phase`, then says `step_started` for `step`.
    pub(super) async fn migration_phase(&self, phase: MigrationPhase, step: Step) -> Result<()> {
        let id = self.id.clone();
        self.inner
            .journal(move |j| j.migration_phase(&id, phase))
            .await?;
        self.events.emit(EventKind::StepStarted { step });
        Ok(())
    }

    /// Says `step_finished` for a step of a move (the migration row holds the state).
    pub(super) fn migration_step_finished<T: Serialize + Summary>(&self, step: Step, value: &T) {
        self.events.emit(EventKind::StepFinished {
            step,
            summary: value.summary(),
            result: serde_json::to_value(value).unwrap_or_default(),
        });
    }

    /// Journals the end of a move (the VM active on `vm.host`, or with `error` where it
    /// was), then says `run_finished` or `run_failed`.
    pub(super) async fn migration_ended(&self, vm: &Vm, error: Option<&Error>) -> Result<()> {
        let (id, v, info) = (self.id.clone(), vm.clone(), error.map(Error::info));
        self.inner
            .journal(move |j| j.end_migration(&id, &v, info.as_ref()))
            .await?;
        match error {
            None => self.events.emit(EventKind::RunFinished {
                provisioned: Some(Box::new(vm.clone())),
            }),
            Some(e) => self.refused(e),
        }
        Ok(())
    }

    /// Says `run_finished` for a request the journal already holds as done (an idempotent
    /// repeat).
    pub(super) fn already_done(&self, vm: &Vm) {
        self.events.emit(EventKind::RunFinished {
            provisioned: Some(Box::new(vm.clone())),
        });
    }
}
