//! One provision under way: the steps, in order and in parallel where they can be,
//! each journaled, timed, retried and reported.

use super::*;

/// A one-line summary of a step's result, for events.
pub(super) trait Summary {
    fn summary(&self) -> String;
}

impl Summary for User {
    fn summary(&self) -> String {
        match &self.display_name {
            Some(d) => format!("{} ({d})", self.name),
            None => self.name.to_string(),
        }
    }
}
impl Summary for HostId {
    fn summary(&self) -> String {
        self.to_string()
    }
}
impl Summary for Lease {
    fn summary(&self) -> String {
        format!("{}/{}", self.ip, self.prefix_len)
    }
}
impl Summary for DnsRecord {
    fn summary(&self) -> String {
        format!("{} -> {}", self.fqdn, self.ip)
    }
}
impl Summary for Template {
    fn summary(&self) -> String {
        self.name.to_string()
    }
}
impl Summary for Disk {
    fn summary(&self) -> String {
        self.path.display().to_string()
    }
}
impl Summary for crate::types::Domain {
    fn summary(&self) -> String {
        format!("{} on {}", self.name, self.host)
    }
}
impl Summary for crate::types::MigrationReport {
    fn summary(&self) -> String {
        match self.downtime_ms {
            Some(d) => format!(
                "moved in {:.1}s, {d} ms downtime",
                self.elapsed_ms as f64 / 1000.0
            ),
            None => format!("moved in {:.1}s", self.elapsed_ms as f64 / 1000.0),
        }
    }
}
impl Summary for () {
    fn summary(&self) -> String {
        String::new()
    }
}
impl Summary for BootstrapReport {
    fn summary(&self) -> String {
        if self.summary.is_empty() {
            if self.bootstrapped {
                "bootstrapped"
            } else {
                "nothing to do"
            }
            .to_owned()
        } else {
            self.summary.clone()
        }
    }
}

/// Why a step did not produce a value.
pub(super) enum StepError {
    /// It ran and failed.
    Failed(Error),
    /// It did not run because another step failed first.
    Skipped,
}

impl From<Error> for StepError {
    fn from(e: Error) -> Self {
        StepError::Failed(e)
    }
}

/// One provision under way.
pub(super) struct Run {
    pub(super) inner: Arc<Inner>,
    pub(super) req: ResolvedRequest,
    pub(super) rec: Recorder,
    pub(super) cancel: CancelToken,
    /// Set once any step failed, so that steps not yet started are skipped.
    pub(super) halt: AtomicBool,
    /// Steps whose intent was recorded, in the order they started.
    pub(super) intents: Mutex<Vec<(Step, UndoKey)>>,
    /// The blocking work of every started step, which a rollback waits for.
    pub(super) work: Mutex<Vec<(Step, crate::work::StepWork)>>,
}

impl Run {
    pub(super) fn key(&self) -> UndoKey {
        UndoKey {
            vm: self.req.name.clone(),
            host: None,
            ip: None,
        }
    }

    /// Runs one step: record its intent, run the backend call in its own task under the
    /// step's time limit, record the result (see [`Recorder`]).
    pub(super) async fn step<T, Fut>(
        &self,
        step: Step,
        key: UndoKey,
        act: impl FnOnce(Progress) -> Fut,
    ) -> Result<T, StepError>
    where
        T: Serialize + Summary + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        if self.halt.load(Ordering::SeqCst) {
            return Err(StepError::Skipped);
        }
        let backend = self.inner.backends.name_of(step).to_owned();
        let result = async {
            if self.cancel.is_cancelled() {
                return Err(cancelled());
            }
            self.rec.step_started(step, &key).await?;
            self.intents
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((step, key));
            let work = crate::work::StepWork::default();
            self.work
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((step, work.clone()));
            let fut = work.clone().scope(act(self.rec.progress(step)));
            let value = guarded(fut, self.inner.timeouts.get(step), Some(&self.cancel))
                .await
                .inspect_err(|_| work.abandon())?;
            self.rec.step_finished(step, &value).await?;
            Ok(value)
        }
        .await;
        result.map_err(|e: Error| {
            let e = e.or_step(step).or_backend(&backend);
            self.halt.store(true, Ordering::SeqCst);
            self.rec.step_failed(step, &e);
            StepError::Failed(e)
        })
    }

    pub(super) async fn execute(self) -> Result<Vm> {
        match self.steps().await {
            Ok(vm) => match self.rec.provisioned(&vm).await {
                Ok(()) => Ok(vm),
                Err(e) => self.fail(e).await,
            },
            Err(e) => self.fail(e).await,
        }
    }

    pub(super) async fn fail(&self, mut error: Error) -> Result<Vm> {
        let todo = std::mem::take(
            &mut *self
                .intents
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        // Blocking work of an abandoned step may still be running (a define, a disk's final
        // link): let it end first, so that the undo below also removes what it made.
        let work = std::mem::take(
            &mut *self
                .work
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut unsettled = Vec::new();
        for (step, w) in work {
            w.abandon();
            if w.busy() {
                self.rec.progress(step).message(WAITING_FOR_BLOCKING_WORK);
            }
            let limit = self.inner.timeouts.get(step);
            if !w.settle(limit).await {
                let key = self.key();
                unsettled.push(UndoFailure {
                    step,
                    resource: resource(step, &key),
                    error: format!(
                        "its blocking work was still running {}s after the step was given up; recover() undoes it later",
                        limit.as_secs_f64()
                    ),
                    kind: ErrorKind::Timeout,
                });
            }
        }
        let mut failures = undo_steps(&self.inner, &self.req.request_id, &self.rec, todo).await;
        for f in unsettled {
            self.rec.undo_failed(&f);
            failures.push(f);
        }
        let state = if failures.is_empty() {
            RunState::Failed
        } else {
            RunState::RollingBack
        };
        for f in failures {
            error.push_undo_failure(f);
        }
        self.rec.failed(state, &error).await;
        Err(error)
    }

    pub(super) async fn steps(&self) -> Result<Vm> {
        let b = self.inner.backends.clone();
        let req = &self.req;

        let retries = &self.inner.retries;
        let users = b.users.clone();
        let (name, r) = (req.user.clone(), retries.clone());
        let user = self
            .step(Step::User, self.key(), move |p| async move {
                with_retries(&r, Step::User, &p, || users.find_user(&name)).await
            })
            .await
            .map_err(first_error(Vec::new()))?;

        // Host, then the template on that host, then the disk on one branch; address and
        // DNS on the other.
        let storage = async {
            let placement = b.placement.clone();
            let (vm, size, owner) = (req.name.clone(), req.size, req.request_id.clone());
            let (r, tpl) = (retries.clone(), req.template.clone());
            let host = self
                .step(Step::Placement, self.key(), move |p| async move {
                    with_retries(&r, Step::Placement, &p, || {
                        placement.reserve_for(&vm, &size, &owner, &tpl)
                    })
                    .await
                })
                .await?;
            let images = b.images.clone();
            let (tname, h, r) = (req.template.clone(), host.clone(), retries.clone());
            let template = self
                .step(Step::Image, self.key(), move |p| async move {
                    with_retries(&r, Step::Image, &p, || images.prepare(&tname, &h, &p)).await
                })
                .await?;
            let images = b.images.clone();
            let (vm, h, t, gib, owner) = (
                req.name.clone(),
                host.clone(),
                template.clone(),
                req.size.disk_gib,
                req.request_id.clone(),
            );
            let key = UndoKey {
                host: Some(host.clone()),
                ..self.key()
            };
            let r = retries.clone();
            let disk = self
                .step(Step::Disk, key, move |p| async move {
                    with_retries(&r, Step::Disk, &p, || {
                        images.create_disk(&vm, &h, &t, gib, &owner, &p)
                    })
                    .await
                })
                .await?;
            Ok::<_, StepError>((host, template, disk))
        };
        let network = async {
            let ip = b.ip.clone();
            let (vm, owner, r) = (req.name.clone(), req.request_id.clone(), retries.clone());
            let lease = self
                .step(Step::Ip, self.key(), move |p| async move {
                    with_retries(&r, Step::Ip, &p, || ip.allocate(&vm, &owner)).await
                })
                .await?;
            let dns = b.dns.clone();
            let (vm, addr, r) = (req.name.clone(), lease.ip, retries.clone());
            let key = UndoKey {
                ip: Some(lease.ip),
                ..self.key()
            };
            let record = self
                .step(Step::Dns, key, move |p| async move {
                    with_retries(&r, Step::Dns, &p, || dns.publish(&vm, addr)).await
                })
                .await?;
            Ok::<_, StepError>((lease, record))
        };
        let (storage, network) = tokio::join!(storage, network);
        let ((host, template, disk), (lease, record)) = match (storage, network) {
            (Ok(s), Ok(n)) => (s, n),
            (s, n) => {
                let errs = [s.err(), n.err()].into_iter().flatten().collect();
                return Err(first_error(errs)(StepError::Skipped));
            }
        };

        // The guest's host key is made here, so the bootstrap step knows it in advance;
        // its private half goes only into the first-boot seed.
        let host_key = crate::seed::HostKey::generate().map_err(|e| e.with_step(Step::Domain))?;
        let mut target = BootstrapTarget {
            vm: req.name.clone(),
            request_id: req.request_id.clone(),
            fqdn: record.fqdn.clone(),
            ip: lease.ip,
            owner: user.clone(),
            settings: req.bootstrap.clone(),
            host_key: Some(host_key.public.clone()),
        };
        let hv = b.hypervisor.clone();
        let mut spec = DomainSpec {
            name: req.name.clone(),
            host: host.clone(),
            size: req.size,
            disk: disk.clone(),
            template,
            lease: lease.clone(),
            fqdn: record.fqdn.clone(),
            owner: req.user.clone(),
            request_id: req.request_id.clone(),
            ssh_keys: user.ssh_keys.clone(),
            seed: None,
        };
        let key = UndoKey {
            host: Some(host.clone()),
            ..self.key()
        };
        let (bs, setup_target, r) = (b.bootstrap.clone(), target.clone(), retries.clone());
        self.step(Step::Domain, key, move |p| async move {
            // What the bootstrapper needs the guest to get at first boot.
            let setup = bs.guest_setup(&setup_target).await?;
            let mut keys = spec.ssh_keys.clone();
            keys.extend(setup.authorized_keys);
            spec.seed = Some(crate::seed::GuestSeed {
                instance_id: spec.request_id.to_string(),
                hostname: spec.name.to_string(),
                fqdn: spec.fqdn.clone(),
                authorized_keys: keys.clone(),
                host_key: Some(host_key),
                cloud_config: setup.cloud_config,
            });
            spec.ssh_keys = keys;
            with_retries(&r, Step::Domain, &p, || hv.create(&spec, &p)).await
        })
        .await
        .map_err(first_error(Vec::new()))?;

        let (bs, hv) = (b.bootstrap.clone(), b.hypervisor.clone());
        target.owner = user;
        let (seed_host, owner, r) = (host.clone(), req.request_id.clone(), retries.clone());
        let report = self
            .step(Step::Bootstrap, self.key(), move |p| async move {
                // The guest has read its first-boot seed once its SSH server answers (the
                // domain step waited for that): the private host key (and any bootstrap
                // secret) in it must not stay attached. The guest lets go of it while the
                // bootstrap runs, not after.
                let (report, discarded) = tokio::join!(
                    with_retries(&r, Step::Bootstrap, &p, || bs.bootstrap(&target, &p)),
                    hv.discard_seed(&target.vm, &seed_host, &owner),
                );
                let report = report?;
                discarded?;
                Ok(report)
            })
            .await
            .map_err(first_error(Vec::new()))?;

        Ok(finished_vm(req, host, &lease, record, disk, &report))
    }
}

/// The progress message of a rollback that waits for a given-up step's blocking work.
pub const WAITING_FOR_BLOCKING_WORK: &str =
    "waiting for its blocking work to end before undoing it";

/// Picks the error to report: the failure of the earliest step.
pub(super) fn first_error(mut others: Vec<StepError>) -> impl FnOnce(StepError) -> Error {
    move |e| {
        others.push(e);
        others
            .into_iter()
            .filter_map(|e| match e {
                StepError::Failed(e) => Some(e),
                StepError::Skipped => None,
            })
            .min_by_key(|e| e.step())
            .unwrap_or_else(|| Error::backend("a step was skipped without a failure"))
    }
}

pub(super) fn cancelled() -> Error {
    Error::new(ErrorKind::Cancelled, "cancelled")
}

/// Runs `fut` in its own task with a time limit; a panic inside it becomes an error.
pub(super) async fn guarded<T: Send + 'static>(
    fut: impl Future<Output = Result<T>> + Send + 'static,
    limit: Duration,
    cancel: Option<&CancelToken>,
) -> Result<T> {
    let mut task = tokio::spawn(fut);
    let cancelled_fut = async {
        match cancel {
            Some(c) => c.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        joined = &mut task => match joined {
            Ok(r) => r,
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                Err(Error::backend(format!("panicked: {msg}")))
            }
            Err(e) => Err(Error::backend("step task was aborted").with_source(e)),
        },
        () = tokio::time::sleep(limit) => {
            task.abort();
            Err(Error::timeout(format!("did not finish within {}s", limit.as_secs_f64())))
        }
        () = cancelled_fut => {
            task.abort();
            Err(cancelled())
        }
    }
}

/// Runs `call` until it succeeds, fails for good, or `step`'s attempts are used up,
/// pausing with exponential backoff and jitter between tries; each retry is reported on
/// `progress`.
pub(super) async fn with_retries<T, F, Fut>(
    retries: &Retries,
    step: Step,
    progress: &Progress,
    mut call: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    use backon::{ExponentialBuilder, Retryable};
    let attempts = retries.attempts(step);
    if attempts <= 1 {
        return call().await;
    }
    let policy = ExponentialBuilder::default()
        .with_min_delay(retries.initial)
        .with_max_delay(retries.max)
        .with_max_times(attempts as usize - 1)
        .with_jitter();
    call.retry(policy)
        .sleep(tokio::time::sleep)
        .when(Error::is_retryable)
        .notify(|e: &Error, pause: Duration| {
            progress.message(format!(
                "retrying in {:.1}s after a transient failure: {e}",
                pause.as_secs_f64()
            ));
        })
        .await
}
