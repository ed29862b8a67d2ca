//! Finishing what a crashed or killed provisioner left: complete a run whose every step
//! finished, roll back any other, finish an interrupted deprovision.

use super::*;

/// What [`Provisioner::recover`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecoveryReport {
    /// Runs whose every step had finished, now recorded as VMs.
    pub completed: Vec<Vm>,
    /// Provisions that were rolled back.
    pub rolled_back: Vec<RequestId>,
    /// Deprovisions that were finished.
    pub removed: Vec<VmName>,
    /// Resources that still could not be removed; a later `recover()` tries again.
    pub still_held: Vec<UndoFailure>,
    /// Runs whose journal rows cannot be read: left exactly as they are.
    pub unreadable: Vec<Unreadable>,
}

impl Provisioner {
    /// Finds the runs that a crashed or killed provisioner left unfinished and finishes
    /// them: a provision whose every step had completed is recorded as a VM; any other
    /// provision is rolled back; an interrupted deprovision is completed. Runs that a live
    /// provisioner (in this or another process) is working on are left alone.
    ///
    /// Safe to call at any time and any number of times.
    pub async fn recover(&self) -> Result<RecoveryReport> {
        let (runs, unreadable) = self.inner.journal(|j| j.unfinished()).await?;
        let mut report = RecoveryReport {
            unreadable,
            ..RecoveryReport::default()
        };
        let mut dead_owners = HashSet::new();
        for run in runs {
            let id = run.request.request_id.clone();
            if !self.abandoned(&run.owner, Some(&id)) {
                continue;
            }
            let Some(_guard) = RunningGuard::try_new(&self.inner, &id) else {
                continue;
            };
            if run.owner != self.inner.owner {
                dead_owners.insert(run.owner.clone());
            }
            let (rid, vm) = (id.to_string(), run.request.name.to_string());
            if let Err(e) = self.recover_run(run, &mut report).await {
                // One run that cannot be read (its steps) or finished does not stop the
                // others; it stays as it is and is reported.
                tracing::warn!(run = %rid, error = %e, "cannot recover run");
                report.unreadable.push(Unreadable {
                    request_id: rid,
                    vm,
                    error: e.to_string(),
                });
            }
        }
        for owner in dead_owners {
            let o = owner.clone();
            let left = self
                .inner
                .journal(move |j| Ok(j.unfinished()?.0.iter().any(|r| r.owner == o)))
                .await?;
            if !left {
                self.inner.journal.forget_owner(&owner);
            }
        }
        Ok(report)
    }

    pub(super) async fn recover_run(
        &self,
        run: RunRecord,
        report: &mut RecoveryReport,
    ) -> Result<()> {
        let inner = &self.inner;
        let id = run.request.request_id.clone();
        let events = RunEvents::new(inner.bus.clone(), id.clone(), run.request.name.clone());
        let rec = Recorder::new(inner.clone(), id.clone(), events);
        let rid = id.clone();
        let steps = inner.journal(move |j| j.steps(&rid)).await?;

        let (target, clean, dirty) = match plan(run.state, &run.request, &steps) {
            Plan::Undo {
                claim,
                clean,
                dirty,
            } => (claim, clean, dirty),
            Plan::Migration => {
                let (from, to, cid) = (run.owner.clone(), inner.owner.clone(), id.clone());
                if !inner
                    .journal(move |j| j.claim(&cid, &from, &to, RunState::Migrating))
                    .await?
                {
                    return Ok(());
                }
                return self.recover_migration(&rec, &run, report).await;
            }
            Plan::Complete(vm) => {
                let vm = *vm;
                let (from, to, cid) = (run.owner.clone(), inner.owner.clone(), id.clone());
                if !inner
                    .journal(move |j| j.claim(&cid, &from, &to, RunState::Running))
                    .await?
                {
                    return Ok(());
                }
                rec.recovery_started();
                rec.provisioned(&vm).await?;
                report.completed.push(vm);
                return Ok(());
            }
        };
        let (from, to, cid) = (run.owner.clone(), inner.owner.clone(), id.clone());
        if !inner
            .journal(move |j| j.claim(&cid, &from, &to, target))
            .await?
        {
            return Ok(());
        }
        rec.recovery_started();
        let failures = self.undo_recorded(&id, &rec).await?;
        report.still_held.extend(failures.iter().cloned());
        let clean_run = failures.is_empty();
        let _ = Self::finish_undo(&rec, failures, clean, dirty).await;
        if clean_run {
            match clean {
                RunState::Removed => report.removed.push(run.request.name.clone()),
                _ => report.rolled_back.push(id),
            }
        }
        Ok(())
    }
}

pub(super) fn output<T: DeserializeOwned>(steps: &[StepRecord], step: Step) -> Option<T> {
    steps
        .iter()
        .find(|s| s.step == step && s.state == StepState::Done)
        .and_then(|s| s.output.clone())
        .and_then(|o| serde_json::from_value(o).ok())
}

/// The VM a run produced, if the journal shows every step done.
pub(super) fn vm_from_steps(req: &ResolvedRequest, steps: &[StepRecord]) -> Option<Vm> {
    if !Step::ALL.iter().all(|st| {
        steps
            .iter()
            .any(|s| s.step == *st && s.state == StepState::Done)
    }) {
        return None;
    }
    let host: HostId = output(steps, Step::Placement)?;
    let lease: Lease = output(steps, Step::Ip)?;
    let record: DnsRecord = output(steps, Step::Dns)?;
    let disk: Disk = output(steps, Step::Disk)?;
    let report: BootstrapReport = output(steps, Step::Bootstrap)?;
    Some(finished_vm(req, host, &lease, record, disk, &report))
}

/// The VM a run made, from what its steps produced.
pub(super) fn finished_vm(
    req: &ResolvedRequest,
    host: HostId,
    lease: &Lease,
    record: DnsRecord,
    disk: Disk,
    report: &BootstrapReport,
) -> Vm {
    Vm {
        name: req.name.clone(),
        fqdn: record.fqdn,
        ip: lease.ip,
        host,
        disk: disk.path,
        owner: req.user.clone(),
        template: req.template.clone(),
        created: OffsetDateTime::now_utc(),
        request_id: req.request_id.clone(),
        bootstrapped: report.bootstrapped,
    }
}

/// What recovery does with an unfinished run: decided from the journal alone.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Plan {
    /// Every step of a provision finished and only the final record is missing: record
    /// the VM.
    Complete(Box<Vm>),
    /// A live migration was interrupted: finish or undo it by where the guest runs.
    Migration,
    /// Undo the recorded steps: claim the run in state `claim`, end it in `clean`, or in
    /// `dirty` when an undo fails (a later `recover()` tries again).
    Undo {
        claim: RunState,
        clean: RunState,
        dirty: RunState,
    },
}

/// The recovery plan of a run in `state` whose journal holds `steps` (sans-I/O).
pub(super) fn plan(state: RunState, request: &ResolvedRequest, steps: &[StepRecord]) -> Plan {
    if state == RunState::Running
        && let Some(vm) = vm_from_steps(request, steps)
    {
        return Plan::Complete(Box::new(vm));
    }
    match state {
        RunState::Migrating => Plan::Migration,
        RunState::Deprovisioning => Plan::Undo {
            claim: RunState::Deprovisioning,
            clean: RunState::Removed,
            dirty: RunState::Deprovisioning,
        },
        _ => Plan::Undo {
            claim: RunState::RollingBack,
            clean: RunState::Failed,
            dirty: RunState::RollingBack,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ResolvedRequest {
        ResolvedRequest {
            request_id: RequestId::new("r-1").unwrap(),
            user: crate::types::UserName::new("alice").unwrap(),
            name: VmName::new("web-1").unwrap(),
            template: TemplateName::new("t").unwrap(),
            size: VmSize::default(),
            bootstrap: BootstrapSettings::default(),
        }
    }

    /// Every step done, with the outputs a finished provision journals.
    fn finished() -> Vec<StepRecord> {
        let key = UndoKey {
            vm: request().name,
            host: None,
            ip: None,
        };
        let out = |step: Step| -> Option<serde_json::Value> {
            Some(match step {
                Step::Placement => serde_json::json!("host-a"),
                Step::Ip => {
                    serde_json::json!({"vm": "web-1", "ip": "10.0.0.5", "prefix_len": 24, "gateway": null})
                }
                Step::Dns => serde_json::json!({"fqdn": "web-1.lab", "ip": "10.0.0.5"}),
                Step::Disk => {
                    serde_json::json!({"vm": "web-1", "path": "/d/web-1.qcow2", "format": "qcow2", "size_gib": 4})
                }
                Step::Bootstrap => serde_json::json!({"bootstrapped": true, "summary": ""}),
                _ => serde_json::Value::Null,
            })
        };
        Step::ALL
            .iter()
            .map(|&step| StepRecord {
                step,
                state: StepState::Done,
                key: key.clone(),
                output: out(step),
            })
            .collect()
    }

    #[test]
    fn a_provision_whose_every_step_finished_is_completed() {
        match plan(RunState::Running, &request(), &finished()) {
            Plan::Complete(vm) => {
                assert_eq!(vm.name.as_str(), "web-1");
                assert_eq!(vm.fqdn, "web-1.lab");
                assert_eq!(vm.ip.to_string(), "10.0.0.5");
                assert!(vm.bootstrapped);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn anything_less_is_rolled_back_and_a_deprovision_is_finished() {
        let rollback = Plan::Undo {
            claim: RunState::RollingBack,
            clean: RunState::Failed,
            dirty: RunState::RollingBack,
        };
        let mut steps = finished();
        steps[7].state = StepState::Intent;
        assert_eq!(
            plan(RunState::Running, &request(), &steps),
            rollback,
            "bootstrap in flight"
        );
        assert_eq!(
            plan(RunState::Running, &request(), &[]),
            rollback,
            "nothing done"
        );
        // A rollback under way is finished, even if every step had been done.
        assert_eq!(
            plan(RunState::RollingBack, &request(), &finished()),
            rollback
        );
        // A step output that cannot be read is not taken for a finished VM.
        let mut broken = finished();
        broken[2].output = Some(serde_json::json!({"not": "a lease"}));
        assert_eq!(plan(RunState::Running, &request(), &broken), rollback);
        assert_eq!(
            plan(RunState::Deprovisioning, &request(), &finished()),
            Plan::Undo {
                claim: RunState::Deprovisioning,
                clean: RunState::Removed,
                dirty: RunState::Deprovisioning,
            }
        );
    }
}
