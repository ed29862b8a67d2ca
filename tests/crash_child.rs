//! A provisioner process for the crash tests: it runs one provision (or a provision and
//! then a deprovision, or a provision and then a live migration to the other host) from a
//! config file, with a fault that kills it with SIGKILL at a chosen step boundary.
//!
//! Usage: `devvm-crash-child CONFIG provision|deprovision|migrate STEP before|after`
//! (`DEVVM_CRASH_RUN=S` names the VM `crashy-S` and its request `crash-run-S`).

use std::process::ExitCode;

use devvm_core::testkit::faults::{self, Fault, FaultPlan};
use devvm_core::{ProvisionRequest, RequestId, Step, UserName, VmName, config::Config};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devvm-crash-child: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: &[String]) -> devvm_core::Result<()> {
    let [_, config, mode, step, when] = args else {
        return Err(devvm_core::Error::invalid_input(
            "usage: devvm-crash-child CONFIG provision|deprovision|migrate STEP before|after",
        ));
    };
    let step: Step = step.parse()?;
    let fault = match when.as_str() {
        "before" => Fault::KillBefore,
        "after" => Fault::KillAfter,
        other => {
            return Err(devvm_core::Error::invalid_input(format!(
                "bad boundary {other}"
            )));
        }
    };
    let config = Config::load(config.as_ref())?;
    let builder = config.builder()?;
    let clean = builder
        .current_backends()
        .ok_or_else(|| devvm_core::Error::invalid_input("config leaves a backend unset"))?;
    // A run of its own (for a journal several test runs share): DEVVM_CRASH_RUN=suffix.
    let suffix = std::env::var("DEVVM_CRASH_RUN")
        .map(|s| format!("-{s}"))
        .unwrap_or_default();
    let req = ProvisionRequest::new(UserName::new("alice")?)
        .with_name(VmName::new(format!("crashy{suffix}"))?)
        .with_request_id(RequestId::new(format!("crash-run{suffix}"))?);
    match mode.as_str() {
        "provision" => {
            let p = builder
                .backends(faults::inject(clean, FaultPlan::new(step, fault)))
                .build()?;
            p.provision(req).await?;
        }
        "deprovision" => {
            let p = builder
                .backends(faults::inject(clean, FaultPlan::new(step, fault).on_undo()))
                .build()?;
            let vm = p.provision(req).await?;
            p.deprovision(&vm.name).await?;
        }
        "migrate" => {
            // Provisioned cleanly; the move's first call of STEP's backend kills.
            let vm = config.builder()?.build()?.provision(req).await?;
            let to = devvm_core::HostId::new(if vm.host.as_str() == "host-a" {
                "host-b"
            } else {
                "host-a"
            })?;
            let p = builder
                .backends(faults::inject(clean, FaultPlan::new(step, fault)))
                .build()?;
            p.migrate(&vm.name, &to).await?;
        }
        other => {
            return Err(devvm_core::Error::invalid_input(format!(
                "bad mode {other}"
            )));
        }
    }
    Ok(())
}
