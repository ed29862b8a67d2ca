//! Live migration as a journaled saga: the placement slot moves to the target, the
//! template and an empty overlay of the same path and size are made there, the hypervisor
//! moves the running guest (copying its overlay), and the source's overlay is removed.
//! Each phase is journaled before it acts, so a failure or a kill at any point leaves the
//! VM running on exactly one host, and `recover()` finishes or undoes the rest.

use super::*;
use crate::journal::{MigrationPhase, MigrationRecord};
use crate::types::MigrationReport;

impl Provisioner {
    /// Moves the running VM `name` to host `to` while it runs (live migration without
    /// shared storage). Its address, DNS records and owner stay; the returned VM names its
    /// new host and disk. Already on `to`: nothing happens.
    ///
    /// An unknown name is [`ErrorKind::NotFound`]; a VM another run is working on is
    /// [`ErrorKind::Conflict`]; no room on `to` is [`ErrorKind::Exhausted`]. On failure the
    /// VM still runs where it was, and what was made on `to` is removed; when even that
    /// fails, the error names what is still held and [`recover`](Self::recover) retries.
    /// An act that failed after the guest had moved after all (a copy that landed past its
    /// time limit) does not undo the move: the moved VM is returned.
    pub async fn migrate(&self, name: &VmName, to: &HostId) -> Result<Vm> {
        let inner = &self.inner;
        let n = name.clone();
        let run = inner
            .journal(move |j| j.live_run_of(&n))
            .await?
            .ok_or_else(|| Error::not_found(format!("no vm named {name}")))?;
        let id = run.request.request_id.clone();
        let Some(guard) = RunningGuard::try_new(inner, &id) else {
            return Err(in_progress(&id));
        };
        if run.state != RunState::Active {
            return Err(in_progress(&id));
        }
        let vm = run
            .vm
            .clone()
            .ok_or_else(|| Error::backend(format!("the journal has no record of vm {name}")))?;
        if &vm.host == to {
            return Ok(vm);
        }
        if !inner.backends.images.disks_per_host() {
            return Err(Error::invalid_input(format!(
                "image backend {} keeps disks in one place for every host (disk_dir); a live \
                 migration without shared storage needs each host's own (pool = ...)",
                inner.backends.images.backend()
            )));
        }
        let (from_owner, me, cid) = (run.owner.clone(), inner.owner.clone(), id.clone());
        if !inner
            .journal(move |j| j.claim(&cid, &from_owner, &me, RunState::Migrating))
            .await?
        {
            return Err(in_progress(&id));
        }
        let events = inner.start_run(&id, name, Operation::Migrate);
        let rec = Recorder::new(inner.clone(), id.clone(), events);
        if let Err(e) = rec.migration_started(&vm.host, to).await {
            // Nothing was done: the run goes back to active as it was.
            let _ = rec.migration_ended(&vm, Some(&e)).await;
            return Err(e);
        }
        let record = MigrationRecord {
            from: vm.host.clone(),
            to: to.clone(),
            phase: MigrationPhase::Started,
        };
        let pending = Mutex::new(None);
        let result = match self
            .move_vm(&rec, &run.request, &vm, &record, &pending)
            .await
        {
            Ok(moved) => rec.migration_ended(&moved, None).await.map(|()| moved),
            Err(e) => {
                self.settle_migration(&rec, &run.request, &vm, &record, e)
                    .await
            }
        };
        let still_running = pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(work) = still_running {
            // An act's blocking work outlived its wait: this run stays this provisioner's
            // (recover() here leaves it alone) until that work has ended.
            tokio::spawn(async move {
                while !work.settle(Duration::from_secs(3600)).await {}
                drop(guard);
            });
        }
        result
    }

    /// Runs one act of a move in its own task under `step`'s time limit; its error names
    /// the step and its backend.
    ///
    /// The act's blocking work is tracked as a pipeline step's is: when the act fails or
    /// runs out of time, the work is told it was abandoned (a live migration aborts its
    /// job) and waited for, the step's limit again but at least 30 s, so that nothing is undone
    /// while a copy may still land. Work still running then makes the error carry an
    /// [`UndoFailure`]: the move is left as it is for [`recover`](Self::recover).
    async fn act<T: Send + 'static>(
        &self,
        step: Step,
        pending: &Mutex<Option<crate::work::StepWork>>,
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let b = &self.inner.backends;
        let limit = self.inner.timeouts.get(step);
        let work = crate::work::StepWork::default();
        let scoped = work.clone().scope(fut);
        match guarded(scoped, limit, None).await {
            Ok(v) => Ok(v),
            Err(e) => {
                work.abandon();
                let mut e = e.or_step(step).or_backend(b.name_of(step));
                // An aborted migration job takes a few seconds to end, whatever the
                // act's own limit was.
                let wait = limit.max(SETTLE_AT_LEAST);
                if !work.settle(wait).await {
                    *pending
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(work.clone());
                    e.push_undo_failure(UndoFailure {
                        step,
                        resource: format!("the {step} act of a live migration"),
                        error: format!(
                            "its blocking work was still running {}s after it was given up; recover() settles the move once it ends",
                            wait.as_secs_f64()
                        ),
                        kind: ErrorKind::Timeout,
                    });
                }
                Err(e)
            }
        }
    }

    /// The acts of a move, in order, each journaled first.
    async fn move_vm(
        &self,
        rec: &Recorder,
        req: &ResolvedRequest,
        vm: &Vm,
        m: &MigrationRecord,
        pending: &Mutex<Option<crate::work::StepWork>>,
    ) -> Result<Vm> {
        let b = &self.inner.backends;
        let (id, to) = (&req.request_id, &m.to);

        rec.migration_phase(MigrationPhase::Placing, Step::Placement)
            .await?;
        let placement = b.placement.clone();
        let (n, h, o) = (vm.name.clone(), to.clone(), id.clone());
        self.act(Step::Placement, pending, async move {
            placement.relocate(&n, &h, &o).await
        })
        .await?;
        rec.migration_step_finished(Step::Placement, to);

        rec.migration_phase(MigrationPhase::Preparing, Step::Image)
            .await?;
        let images = b.images.clone();
        let (tname, h, p) = (req.template.clone(), to.clone(), rec.progress(Step::Image));
        let template = self
            .act(Step::Image, pending, async move {
                images.prepare(&tname, &h, &p).await
            })
            .await?;
        rec.migration_step_finished(Step::Image, &template);
        let images = b.images.clone();
        let (n, h, o, gib, p) = (
            vm.name.clone(),
            to.clone(),
            id.clone(),
            req.size.disk_gib,
            rec.progress(Step::Disk),
        );
        let tpl = template.clone();
        let disk = self
            .act(Step::Disk, pending, async move {
                images.create_disk(&n, &h, &tpl, gib, &o, &p).await
            })
            .await?;
        if disk.path != vm.disk {
            return Err(Error::invalid_input(format!(
                "the disk on {to} would be {}, not {} as on {}: the hosts' pools must have the same path",
                disk.path.display(),
                vm.disk.display(),
                m.from
            ))
            .with_step(Step::Disk));
        }
        rec.migration_step_finished(Step::Disk, &disk);

        rec.migration_phase(MigrationPhase::Migrating, Step::Domain)
            .await?;
        let hv = b.hypervisor.clone();
        let (n, f, h, o, p) = (
            vm.name.clone(),
            m.from.clone(),
            to.clone(),
            id.clone(),
            rec.progress(Step::Domain),
        );
        let report: MigrationReport = self
            .act(Step::Domain, pending, async move {
                hv.migrate(&n, &f, &h, &o, &p).await
            })
            .await?;
        rec.migration_step_finished(Step::Domain, &report);
        self.finish_move(rec, req, vm, m).await
    }

    /// The guest runs on the target: remove the source's overlay, and the VM is on `to`.
    async fn finish_move(
        &self,
        rec: &Recorder,
        req: &ResolvedRequest,
        vm: &Vm,
        m: &MigrationRecord,
    ) -> Result<Vm> {
        let b = &self.inner.backends;
        rec.migration_phase(MigrationPhase::Finishing, Step::Disk)
            .await?;
        let gone = b
            .images
            .delete_disk(&vm.name, &m.from, &req.request_id)
            .await
            .map_err(|e| e.or_step(Step::Disk).or_backend(b.name_of(Step::Disk)))?;
        if let Undone::Foreign { holder } = gone {
            rec.left_alone(
                Step::Disk,
                format!("disk of vm {} on {}", vm.name, m.from),
                holder,
            );
        }
        rec.progress(Step::Disk)
            .message(format!("removed the disk of {} on {}", vm.name, m.from));
        let moved = Vm {
            host: m.to.clone(),
            ..vm.clone()
        };
        rec.migration_step_finished(Step::Disk, &moved.host);
        Ok(moved)
    }

    /// After a failed act: when the guest runs on the target after all, finish the move
    /// (and it stands: the moved VM); otherwise undo what was made there (the error to
    /// give the caller).
    async fn settle_migration(
        &self,
        rec: &Recorder,
        req: &ResolvedRequest,
        vm: &Vm,
        m: &MigrationRecord,
        mut error: Error,
    ) -> Result<Vm> {
        rec.step_failed(error.step().unwrap_or(Step::Domain), &error);
        if !error.undo_failures().is_empty() {
            // An act's blocking work may still be moving the guest: undoing now could
            // delete the disk it lands on. The run stays `migrating` for recover().
            for f in error.undo_failures() {
                rec.undo_failed(f);
            }
            rec.refused(&error);
            return Err(error);
        }
        match self.undo_move(rec, req, vm, m).await {
            Ok(Settled::Moved(moved)) => {
                // The guest moved even though an act failed (a copy that landed after its
                // time limit, a removal that worked the second time): the move stands.
                rec.migration_ended(&moved, None).await?;
                Ok(moved)
            }
            Ok(Settled::Undone(failures)) if failures.is_empty() => {
                if let Err(e) = rec.migration_ended(vm, Some(&error)).await {
                    tracing::error!(error = %e, "cannot record the end of an undone migration; recover() will finish it");
                }
                Err(error)
            }
            Ok(Settled::Undone(failures)) => {
                for f in failures {
                    error.push_undo_failure(f);
                }
                // The run stays `migrating`: recover() tries the rest again.
                rec.refused(&error);
                Err(error)
            }
            Err(e) => {
                rec.refused(&e);
                Err(e)
            }
        }
    }

    /// Finishes or undoes a move, by where the guest is now.
    async fn undo_move(
        &self,
        rec: &Recorder,
        req: &ResolvedRequest,
        vm: &Vm,
        m: &MigrationRecord,
    ) -> Result<Settled> {
        let b = &self.inner.backends;
        let on_target = b.hypervisor.domain(&vm.name, &m.to).await?.is_some();
        let on_source = b.hypervisor.domain(&vm.name, &m.from).await?.is_some();
        if on_target && !on_source {
            return self.finish_move(rec, req, vm, m).await.map(Settled::Moved);
        }
        if on_target && on_source {
            // Defined on both (a provisioner killed between the target's start and the
            // source's end): which copy holds the guest's latest state cannot be proven
            // here, so nothing is deleted and the move is reported as still held.
            let f = UndoFailure {
                step: Step::Domain,
                resource: format!("domain of vm {} (on {} and on {})", vm.name, m.from, m.to),
                error: "the domain is defined on both hosts; nothing was removed, decide which \
                        one runs the guest and remove the other, then run recover()"
                    .into(),
                kind: ErrorKind::Conflict,
            };
            rec.undo_failed(&f);
            return Ok(Settled::Undone(vec![f]));
        }
        let mut failures = Vec::new();
        let key = UndoKey {
            vm: vm.name.clone(),
            host: Some(m.to.clone()),
            ip: None,
        };
        // The overlay made on the target (owner-checked: a disk that is not this run's
        // stays, and is reported).
        match b.images.delete_disk(&vm.name, &m.to, &req.request_id).await {
            Ok(Undone::Foreign { holder }) => rec.left_alone(
                Step::Disk,
                format!("disk of vm {} on {}", vm.name, m.to),
                holder,
            ),
            Ok(_) => rec
                .progress(Step::Disk)
                .message(format!("removed the disk made for {} on {}", vm.name, m.to)),
            Err(e) => failures.push(UndoFailure {
                step: Step::Disk,
                resource: resource(Step::Disk, &key),
                error: e.to_string(),
                kind: e.kind(),
            }),
        }
        // The slot goes back where the guest runs, if it moved.
        let slot = b.placement.reservation(&vm.name).await;
        if !matches!(&slot, Ok(Some(h)) if *h == m.from)
            && let Err(e) = b
                .placement
                .relocate(&vm.name, &m.from, &req.request_id)
                .await
        {
            failures.push(UndoFailure {
                step: Step::Placement,
                resource: format!("placement slot of vm {} (on {})", vm.name, m.to),
                error: e.to_string(),
                kind: e.kind(),
            });
        }
        for f in &failures {
            rec.undo_failed(f);
        }
        Ok(Settled::Undone(failures))
    }

    /// Finishes a migration a killed provisioner left (the run is claimed by this one).
    pub(super) async fn recover_migration(
        &self,
        rec: &Recorder,
        run: &RunRecord,
        report: &mut RecoveryReport,
    ) -> Result<()> {
        let id = run.request.request_id.clone();
        let rid = id.clone();
        let vm = run.vm.clone().ok_or_else(|| {
            Error::backend(format!(
                "the journal has no record of vm {}",
                run.request.name
            ))
        })?;
        let Some(m) = self.inner.journal(move |j| j.migration(&rid)).await? else {
            // Claimed before anything was recorded: nothing moved.
            rec.migration_ended(&vm, None).await?;
            return Ok(());
        };
        rec.recovery_started();
        match self.undo_move(rec, &run.request, &vm, &m).await? {
            Settled::Moved(moved) => {
                rec.migration_ended(&moved, None).await?;
                report.completed.push(moved);
            }
            Settled::Undone(failures) if failures.is_empty() => {
                let e = Error::new(
                    ErrorKind::Cancelled,
                    "the migration was interrupted; the vm stays where it was",
                );
                rec.migration_ended(&vm, Some(&e)).await?;
                report.rolled_back.push(id);
            }
            Settled::Undone(failures) => report.still_held.extend(failures),
        }
        Ok(())
    }
}

/// The least time a given-up act of a move is waited for before the move is left to
/// `recover()`: enough for libvirt to end an aborted migration job.
const SETTLE_AT_LEAST: Duration = Duration::from_secs(30);

/// Where a move ended up.
enum Settled {
    /// The guest runs on the target; the move is complete.
    Moved(Vm),
    /// The guest runs on the source; what was made for the move is undone, except these.
    Undone(Vec<UndoFailure>),
}
