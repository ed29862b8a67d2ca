//! Provision one VM from a config file, printing every progress event as it arrives,
//! then (unless `--keep`) deprovision it again.
//!
//! ```text
//! cargo run --example provision -- --config devvm.toml --user alice [--name web-1] [--keep] [--json]
//! ```

#![allow(clippy::print_stdout)] // printing progress is this program's job

use std::process::ExitCode;

use devvm_core::{EventKind, ProvisionRequest, Provisioner, UserName, VmName};

struct Args {
    config: String,
    user: String,
    name: Option<String>,
    keep: bool,
    json: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut config, mut user, mut name, mut keep, mut json) = (None, None, None, false, false);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--config" => config = it.next(),
            "--user" => user = it.next(),
            "--name" => name = it.next(),
            "--keep" => keep = true,
            "--json" => json = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        config: config.ok_or("--config PATH is required")?,
        user: user.ok_or("--user NAME is required")?,
        name,
        keep,
        json,
    })
}

fn describe(kind: &EventKind) -> Option<String> {
    Some(match kind {
        EventKind::RunStarted { operation } => format!("{operation:?} started"),
        EventKind::StepStarted { step } => format!("[{step}] started"),
        EventKind::StepProgress { step, message, .. } => format!("[{step}]   {message}"),
        EventKind::StepFinished { step, summary, .. } => format!("[{step}] done: {summary}"),
        EventKind::StepFailed { step, error } => format!("[{step}] FAILED: {}", error.message),
        EventKind::StepUndone { step } => format!("[{step}] undone"),
        EventKind::UndoFailed { failure } => format!("[{}] UNDO FAILED: {failure}", failure.step),
        EventKind::Warning { message } => format!("warning: {message}"),
        EventKind::LeftAlone {
            step,
            resource,
            holder,
        } => format!("[{step}] left alone: {resource} (held by {holder})"),
        EventKind::RunFinished { .. } => "finished".to_owned(),
        EventKind::RunFailed { error } => format!("failed: {}", error.message),
        _ => return None,
    })
}

async fn run(args: Args) -> devvm_core::Result<()> {
    let provisioner = Provisioner::from_config(&args.config)?;
    let mut events = provisioner.subscribe();
    let json = args.json;
    let printer = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if json {
                if let Ok(line) = serde_json::to_string(&event) {
                    println!("{line}");
                }
            } else if let Some(line) = describe(&event.kind) {
                println!("{:>10}  {line}", event.vm);
            }
        }
    });
    let mut req = ProvisionRequest::new(UserName::new(&args.user)?);
    if let Some(name) = &args.name {
        req = req.with_name(VmName::new(name)?);
    }
    let vm = provisioner.provision(req).await?;
    println!("{} is up: {} ({}) on {}", vm.name, vm.fqdn, vm.ip, vm.host);
    if !args.keep {
        provisioner.deprovision(&vm.name).await?;
        println!("{} removed", vm.name);
    }
    // Dropping the provisioner ends the event stream once every event was printed.
    drop(provisioner);
    let _ = printer.await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("provision: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("provision: {e}");
            ExitCode::FAILURE
        }
    }
}
