//! The demo behind `scripts/demo`: provision a real VM in the lab for a test user with
//! live progress, show that its DNS name resolves (asked of BIND, not of the library) and
//! that it answers on SSH, then tear it down (unless `--keep`) and count, from the
//! services themselves, what was left behind.
//!
//! ```text
//! demo --config devvm.toml [--user alice] [--keep] [--fleet]
//! demo --config devvm.toml --remove NAME      # tear down a VM an earlier --keep left
//! ```
//! Prints progress lines, then one JSON line
//! `{"name","fqdn","ip","host","dns_ok","reachable","bootstrapped","seconds"}`, and after
//! teardown `{"leaked": N}`. With `--fleet` (two lab hosts) the VM is then moved live to
//! the other host, and `{"migrated_to","dns_ok","reachable","seconds"}` is printed before
//! the teardown counts what leaked on every host.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a terminal program

use std::process::ExitCode;
use std::time::{Duration, Instant};

use devvm_core::{EventKind, ProvisionRequest, Provisioner, UserName};
use devvm_examples::lab::{LabEnv, ssh_answers};

struct Args {
    config: String,
    user: String,
    keep: bool,
    fleet: bool,
    remove: Option<String>,
    template: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut config, mut user, mut keep, mut remove) = (None, "alice".to_owned(), false, None);
    let mut fleet = false;
    let mut template = None;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => config = it.next(),
            "--user" => user = it.next().ok_or("--user needs a name")?,
            "--keep" => keep = true,
            "--fleet" => fleet = true,
            "--template" => template = Some(it.next().ok_or("--template needs a name")?),
            "--remove" => remove = Some(it.next().ok_or("--remove needs a vm name")?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        config: config.ok_or("--config PATH is required")?,
        user,
        keep,
        fleet,
        remove,
        template,
    })
}

fn line(kind: &EventKind, t: f64) -> Option<String> {
    let s = match kind {
        EventKind::StepStarted { step } => format!("{step:>9}  started"),
        EventKind::StepProgress { step, message, .. } => format!("{step:>9}  {message}"),
        EventKind::StepFinished { step, summary, .. } => format!("{step:>9}  ✓ {summary}"),
        EventKind::StepFailed { step, error } => format!("{step:>9}  ✗ {}", error.message),
        EventKind::StepUndone { step } => format!("{step:>9}  ↶ undone"),
        EventKind::UndoFailed { failure } => {
            format!("{:>9}  ✗ undo failed: {failure}", failure.step)
        }
        EventKind::Warning { message } => format!("  warning  {message}"),
        EventKind::Lagged { missed } => format!("           … {missed} events not shown"),
        EventKind::LeftAlone {
            step,
            resource,
            holder,
        } => format!("{step:>9}  ↷ left alone: {resource} (held by {holder})"),
        _ => return None,
    };
    Some(format!("[{t:6.1}s] {s}"))
}

async fn run(args: Args) -> Result<bool, String> {
    let env = LabEnv::from_env().ok_or("not in the lab environment (run through scripts/demo)")?;
    let p = Provisioner::from_config(&args.config).map_err(|e| e.to_string())?;
    // Whatever a killed earlier demo left unfinished is cleaned up first.
    let rec = p.recover().await.map_err(|e| e.to_string())?;
    if !rec.rolled_back.is_empty() || !rec.removed.is_empty() {
        eprintln!(
            "recovered {} interrupted run(s) first",
            rec.rolled_back.len() + rec.removed.len()
        );
    }
    if let Some(name) = &args.remove {
        let name = devvm_core::VmName::new(name).map_err(|e| e.to_string())?;
        let vm = p
            .get(&name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no vm named {name}"))?;
        p.deprovision(&name)
            .await
            .map_err(|e| format!("deprovision failed: {e}"))?;
        let left = env.leftovers(name.as_str(), &vm.fqdn, Some(vm.ip));
        println!(
            "{}",
            serde_json::json!({ "removed": name, "leaked": left.len() })
        );
        return Ok(left.is_empty());
    }
    let start = Instant::now();
    let mut events = p.subscribe();
    let printer = tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if let Some(l) = line(&e.kind, start.elapsed().as_secs_f64()) {
                println!("{l}");
            }
        }
    });
    let user = UserName::new(&args.user).map_err(|e| e.to_string())?;
    let mut req = ProvisionRequest::new(user.clone());
    // `debian`: the lab's real Debian 12 (systemd, cloud-init, OpenSSH), which wants more
    // memory than the busybox guest; `busybox`: the config's default; else a template name.
    match args.template.as_deref() {
        None | Some("busybox") => {}
        Some("debian") => {
            let name = std::env::var("DEVVM_LAB_TEMPLATE_DEBIAN")
                .map_err(|_| "the lab has no Debian template (DEVVM_LAB_TEMPLATE_DEBIAN)")?;
            req = req
                .with_template(devvm_core::TemplateName::new(name).map_err(|e| e.to_string())?)
                .with_memory_mib(512);
            println!(
                "(the Debian guest boots systemd and cloud-init under emulation: about a minute)"
            );
        }
        Some(other) => {
            req =
                req.with_template(devvm_core::TemplateName::new(other).map_err(|e| e.to_string())?)
        }
    }
    println!("provisioning a vm for {user} ...");
    let vm = p
        .provision(req)
        .await
        .map_err(|e| format!("provision failed: {e}"))?;
    let seconds = start.elapsed().as_secs_f64();
    let dns_ok = env.dns_a(&vm.fqdn) == vec![vm.ip.to_string()]
        && env.dns_ptr(vm.ip) == vec![vm.fqdn.clone()];
    let reachable = ssh_answers(vm.ip, Duration::from_secs(60));
    println!(
        "{}",
        serde_json::json!({
            "name": vm.name, "fqdn": vm.fqdn, "ip": vm.ip, "host": vm.host,
            "dns_ok": dns_ok, "reachable": reachable, "bootstrapped": vm.bootstrapped,
            "seconds": (seconds * 10.0).round() / 10.0,
        })
    );
    let (mut dns_ok, mut reachable) = (dns_ok, reachable);
    let mut vm = vm;
    if args.fleet {
        let to = env
            .host_uris
            .iter()
            .find(|h| h.as_str() != vm.host.as_str())
            .ok_or("--fleet needs two lab hosts (scripts/lab up --hosts 2)")?;
        let to = devvm_core::HostId::new(to).map_err(|e| e.to_string())?;
        let n = |h: &devvm_core::HostId| {
            env.host_uris
                .iter()
                .position(|u| u == h.as_str())
                .map_or(0, |i| i + 1)
        };
        println!(
            "moving {} live from host {} to host {} ...",
            vm.name,
            n(&vm.host),
            n(&to)
        );
        let t = Instant::now();
        vm = p
            .migrate(&vm.name, &to)
            .await
            .map_err(|e| format!("migration failed: {e}"))?;
        dns_ok &= env.dns_a(&vm.fqdn) == vec![vm.ip.to_string()];
        reachable &= ssh_answers(vm.ip, Duration::from_secs(60));
        println!(
            "{}",
            serde_json::json!({
                "migrated_to": vm.host, "host": n(&vm.host), "dns_ok": dns_ok,
                "reachable": reachable, "on_hosts": env.domain_hosts(vm.name.as_str()),
                "seconds": (t.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            })
        );
    }
    if args.keep {
        println!(
            "kept {name}: log in with `scripts/lab exec ssh -i $DEVVM_LAB_SSH_KEY root@{ip}`; \
             remove it with `scripts/demo --remove {name}`",
            name = vm.name,
            ip = vm.ip
        );
    } else {
        p.deprovision(&vm.name)
            .await
            .map_err(|e| format!("deprovision failed: {e}"))?;
        let left = env.leftovers(vm.name.as_str(), &vm.fqdn, Some(vm.ip));
        for l in &left {
            eprintln!("leaked: {l}");
        }
        if args.fleet {
            // Counted host by host too: nothing on the host it left, nothing where it went.
            let per_host: serde_json::Map<String, serde_json::Value> = env
                .leftovers_per_host(vm.name.as_str())
                .into_iter()
                .enumerate()
                .map(|(i, (uri, l))| {
                    for x in &l {
                        eprintln!("leaked on host {}: {x}", i + 1);
                    }
                    (format!("host{} {uri}", i + 1), l.len().into())
                })
                .collect();
            println!("{}", serde_json::json!({ "leaked_per_host": per_host }));
        }
        println!("{}", serde_json::json!({ "leaked": left.len() }));
        if !left.is_empty() {
            return Ok(false);
        }
    }
    drop(p);
    let _ = printer.await;
    Ok(dns_ok && reachable)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}
