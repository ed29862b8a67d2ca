//! `devvm`: the command line over the library, for people and for scripts.
//!
//! ```text
//! cargo run -p devvm-examples --bin devvm -- [--config PATH] [--json] provision --user alice [--name web-1] [--template T]
//! cargo run -p devvm-examples --bin devvm -- deprovision web-1
//! cargo run -p devvm-examples --bin devvm -- list
//! cargo run -p devvm-examples --bin devvm -- recover
//! cargo run -p devvm-examples --bin devvm -- images sync
//! ```
//!
//! The config defaults to `$DEVVM_CONFIG`, else `/etc/devvm/devvm.toml`. On a terminal each
//! step gets a spinner with its latest message; `--json` prints every event and the
//! result as JSON lines instead. An error is one line on stderr, and the exit code tells
//! its kind (see [`exit_code`]). Ctrl-C cancels a provision, which then rolls back.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a terminal program

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use devvm_core::{
    CancelToken, Error, ErrorKind, Event, EventKind, HostId, ProvisionRequest, Provisioner, Step,
    TemplateName, UserName, VmName,
};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Provision developer VMs.
#[derive(Debug, Parser)]
#[command(name = "devvm", version, about)]
struct Cli {
    /// The config file (default: $DEVVM_CONFIG, else /etc/devvm/devvm.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print events and results as JSON lines.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Provision a VM for a user.
    Provision {
        /// The owner (checked in the directory).
        #[arg(long)]
        user: String,
        /// The VM name (default: derived from the user).
        #[arg(long)]
        name: Option<String>,
        /// The template (default: the config's).
        #[arg(long)]
        template: Option<String>,
    },
    /// Remove a VM and everything it holds.
    Deprovision {
        /// The VM name.
        name: String,
    },
    /// List the VMs that exist.
    List,
    /// Move a running VM to another host (live migration; its address and name stay).
    Migrate {
        /// The VM name.
        name: String,
        /// The host to move it to (as the config's placement names it).
        #[arg(long)]
        to: String,
    },
    /// List the placement hosts: capacity, use and VMs.
    Hosts,
    /// Move every VM off a host (one live migration at a time).
    Drain {
        /// The host to empty.
        host: String,
        /// Only say which moves would be made.
        #[arg(long)]
        dry_run: bool,
    },
    /// Move VMs so that no host is above capacity and the hosts are evenly used.
    Rebalance {
        /// Only say which moves would be made.
        #[arg(long)]
        dry_run: bool,
    },
    /// Finish or roll back runs that a killed provisioner left.
    Recover,
    /// Template images.
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
    /// The shared database of `[ip] backend = "postgres"`.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DbCommand {
    /// Move an embedded (SQLite) state into PostgreSQL so a team can grow without
    /// re-provisioning: the leases of an SQLite lease database (same subnet; needs
    /// `[ip] backend = "postgres"`), the slots of a placement database (`--placement`;
    /// needs `[placement] database`), and the VMs of a journal (`--journal STATE_DIR`;
    /// needs `[journal] database`). Each part is all or nothing, and again is a no-op.
    Import {
        /// The kind of store to import from (only `sqlite`).
        #[arg(long, value_parser = ["sqlite"])]
        from: String,
        /// The SQLite lease database (`leases.sqlite3`).
        path: Option<std::path::PathBuf>,
        /// The SQLite placement database (`placement.sqlite3` in the old state directory).
        #[arg(long)]
        placement: Option<std::path::PathBuf>,
        /// The old state directory whose journal (`journal.sqlite3`) holds the VMs.
        #[arg(long)]
        journal: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ImagesCommand {
    /// Sync the default template and every cached one from the registry.
    Sync,
}

/// The exit code of each error kind (2 is a usage error, from clap).
fn exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::NotFound => 3,
        ErrorKind::AlreadyExists => 4,
        ErrorKind::InvalidInput => 5,
        ErrorKind::Exhausted => 6,
        ErrorKind::Unauthorized => 7,
        ErrorKind::Conflict => 8,
        ErrorKind::Unavailable => 9,
        ErrorKind::Timeout => 10,
        ErrorKind::Cancelled => 130,
        _ => 1,
    }
}

/// Shows events: spinners on a terminal, JSON lines with `--json`, plain lines otherwise.
struct Display {
    json: bool,
    bars: Option<(MultiProgress, BTreeMap<Step, ProgressBar>)>,
}

impl Display {
    fn new(json: bool) -> Self {
        let bars = (!json && std::io::stderr().is_terminal())
            .then(|| (MultiProgress::new(), BTreeMap::new()));
        Display { json, bars }
    }

    fn bar(&mut self, step: Step) -> Option<&ProgressBar> {
        let (multi, bars) = self.bars.as_mut()?;
        Some(bars.entry(step).or_insert_with(|| {
            let b = multi.add(ProgressBar::new_spinner());
            b.set_style(
                ProgressStyle::with_template("{spinner:.cyan} {prefix:>9.bold} {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.set_prefix(step.to_string());
            b.enable_steady_tick(Duration::from_millis(120));
            b
        }))
    }

    fn show(&mut self, e: &Event) {
        if self.json {
            if let Ok(line) = serde_json::to_string(e) {
                println!("{line}");
            }
            return;
        }
        if let EventKind::Warning { message } = &e.kind {
            match &self.bars {
                Some((multi, _)) => {
                    let _ = multi.println(format!("warning: {message}"));
                }
                None => eprintln!("warning: {message}"),
            }
            return;
        }
        let line = match &e.kind {
            EventKind::StepStarted { step } => (*step, "started".to_owned(), None),
            EventKind::StepProgress { step, message, .. } => (*step, message.clone(), None),
            EventKind::StepFinished { step, summary, .. } => {
                (*step, format!("✓ {summary}"), Some(true))
            }
            EventKind::StepFailed { step, error } => {
                (*step, format!("✗ {}", error.message), Some(false))
            }
            EventKind::StepUndone { step } => (*step, "↶ undone".to_owned(), Some(true)),
            EventKind::UndoFailed { failure } => (
                failure.step,
                format!("✗ undo failed: {failure}"),
                Some(false),
            ),
            EventKind::LeftAlone {
                step,
                resource,
                holder,
            } => (
                *step,
                format!("↷ left alone: {resource} (held by {holder})"),
                None,
            ),
            _ => return,
        };
        let (step, message, done) = line;
        match self.bar(step) {
            Some(b) => {
                b.set_message(message);
                if done.is_some() {
                    b.finish();
                } else if b.is_finished() {
                    b.reset();
                    b.enable_steady_tick(Duration::from_millis(120));
                }
            }
            None => eprintln!("{step:>9}  {message}"),
        }
    }

    fn clear(&mut self) {
        if let Some((multi, bars)) = self.bars.as_mut() {
            for b in bars.values() {
                if !b.is_finished() {
                    b.finish();
                }
            }
            let _ = multi.clear();
            bars.clear();
        }
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    let config = cli
        .config
        .or_else(|| std::env::var_os("DEVVM_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/etc/devvm/devvm.toml"));
    let p = Provisioner::from_config(&config)?;
    let mut display = Display::new(cli.json);
    match cli.command {
        Command::Provision {
            user,
            name,
            template,
        } => {
            let mut req = ProvisionRequest::new(UserName::new(&user)?);
            if let Some(n) = name {
                req = req.with_name(VmName::new(&n)?);
            }
            if let Some(t) = template {
                req = req.with_template(TemplateName::new(&t)?);
            }
            let cancel = CancelToken::new();
            let mut run = p.start_provision(req, cancel.clone());
            loop {
                tokio::select! {
                    e = run.next_event() => match e {
                        Some(e) => display.show(&e),
                        None => break,
                    },
                    _ = tokio::signal::ctrl_c() => {
                        eprintln!("cancelling: rolling back what was done ...");
                        cancel.cancel();
                    }
                }
            }
            display.clear();
            let vm = run.finish().await?;
            if cli.json {
                println!("{}", serde_json::json!({ "vm": vm }));
            } else {
                println!("{}  {}  {}  on {}", vm.name, vm.fqdn, vm.ip, vm.host);
            }
        }
        Command::Deprovision { name } => {
            let name = VmName::new(&name)?;
            let mut run = p.start_deprovision(name.clone());
            while let Some(e) = run.next_event().await {
                display.show(&e);
            }
            display.clear();
            run.finish().await?;
            if cli.json {
                println!("{}", serde_json::json!({ "removed": name }));
            } else {
                println!("{name} removed");
            }
        }
        Command::Migrate { name, to } => {
            let name = VmName::new(&name)?;
            let mut run = p.start_migrate(name, HostId::new(&to)?);
            while let Some(e) = run.next_event().await {
                display.show(&e);
            }
            display.clear();
            let vm = run.finish().await?;
            if cli.json {
                println!("{}", serde_json::json!(vm));
            } else {
                println!("{} runs on {} ({}, {})", vm.name, vm.host, vm.fqdn, vm.ip);
            }
        }
        Command::Hosts => {
            let slot = p.defaults().size;
            for h in p.hosts().await? {
                if cli.json {
                    let mut v = serde_json::json!(h);
                    v["free_slots"] = h.free_slots(&slot).into();
                    println!("{v}");
                } else {
                    println!(
                        "{}  {}  vms {}  free slots {} (of {} vCPU / {} MiB / {} GiB)  \
                         vcpus {}/{}  memory {}/{} MiB  disk {}/{} GiB",
                        h.host,
                        if h.reachable { "up" } else { "UNREACHABLE" },
                        h.vms.len(),
                        h.free_slots(&slot),
                        slot.vcpus,
                        slot.memory_mib,
                        slot.disk_gib,
                        h.used.vcpus,
                        h.capacity.vcpus,
                        h.used.memory_mib,
                        h.capacity.memory_mib,
                        h.used.disk_gib,
                        h.capacity.disk_gib,
                    );
                    for t in &h.templates {
                        println!("    template {t}");
                    }
                }
            }
        }
        Command::Drain { host, dry_run } => {
            let moves = p.drain(&HostId::new(&host)?, dry_run).await?;
            print_moves(&moves, dry_run, cli.json);
        }
        Command::Rebalance { dry_run } => {
            let moves = p.rebalance(dry_run).await?;
            print_moves(&moves, dry_run, cli.json);
        }
        Command::List => {
            let vms = p.list().await?;
            if cli.json {
                for vm in vms {
                    println!("{}", serde_json::json!(vm));
                }
            } else if vms.is_empty() {
                println!("no vms");
            } else {
                for vm in vms {
                    println!("{:<24} {:<15} {:<10} {}", vm.name, vm.ip, vm.owner, vm.fqdn);
                }
            }
        }
        Command::Recover => {
            let r = p.recover().await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "completed": r.completed.iter().map(|v| v.name.to_string()).collect::<Vec<_>>(),
                        "rolled_back": r.rolled_back,
                        "removed": r.removed,
                        "still_held": r.still_held,
                        "unreadable": r.unreadable,
                    })
                );
            } else {
                println!(
                    "completed {}, rolled back {}, removed {}",
                    r.completed.len(),
                    r.rolled_back.len(),
                    r.removed.len()
                );
                for f in &r.still_held {
                    println!("still held: {f}");
                }
                for u in &r.unreadable {
                    println!("unreadable journal row, left as it is: {u}");
                }
            }
            if let Some(f) = r.still_held.first() {
                return Err(Error::new(f.kind, "some resources are still held"));
            }
        }
        Command::Db {
            command:
                DbCommand::Import {
                    from: _,
                    path,
                    placement,
                    journal,
                },
        } => {
            let c = devvm_core::config::Config::load(&config)?;
            if path.is_none() && placement.is_none() && journal.is_none() {
                return Err(Error::invalid_input(
                    "db import: name what to import: a lease database, --placement FILE or --journal STATE_DIR",
                ));
            }
            let mut report = serde_json::Map::new();
            if let Some(path) = path {
                let (n, added) = import_leases(&c, &config, &path).await?;
                report.insert("leases".into(), n.into());
                report.insert("added".into(), added.into());
                if !cli.json {
                    println!(
                        "{n} lease(s) in {}, {added} added to PostgreSQL",
                        path.display()
                    );
                }
            }
            if let Some(file) = placement {
                #[derive(serde::Deserialize)]
                struct Shared {
                    database: Option<devvm_core::backends::postgres::PostgresDatabase>,
                }
                let db = c.options::<Shared>(Step::Placement)?.database.ok_or_else(|| {
                    Error::invalid_input(format!(
                        "db import --placement needs [placement] database = {{ url, password }} in {}",
                        config.display()
                    ))
                })?;
                let to = devvm_core::backends::postgres::reservations::PostgresReservations::new(
                    &db,
                    c.base_dir(),
                )?;
                let r = devvm_core::backends::placement::import_reservations(&file, &to).await?;
                report.insert("placement".into(), serde_json::json!(r));
                if !cli.json {
                    println!(
                        "{} slot(s) in {}, {} added to PostgreSQL, {} without an owner left out",
                        r.slots,
                        file.display(),
                        r.added,
                        r.unowned
                    );
                }
            }
            if let Some(dir) = journal {
                let section = c.journal.clone().ok_or_else(|| {
                    Error::invalid_input(format!(
                        "db import --journal needs a [journal] database = {{ url, password }} in {}",
                        config.display()
                    ))
                })?;
                let base = c.base_dir().to_owned();
                let r = tokio::task::spawn_blocking(move || {
                    devvm_core::import_sqlite_journal(&dir, &section, &base)
                })
                .await
                .map_err(|e| Error::backend("the import stopped").with_source(e))??;
                report.insert("journal".into(), serde_json::json!(r));
                if !cli.json {
                    println!(
                        "{} vm(s) in the journal, {} added to PostgreSQL",
                        r.vms, r.added
                    );
                }
            }
            if cli.json {
                println!("{}", serde_json::Value::Object(report));
            }
        }
        Command::Images {
            command: ImagesCommand::Sync,
        } => {
            let images = p.backends().images.clone();
            let mut names: Vec<TemplateName> = images
                .templates()
                .await?
                .into_iter()
                .map(|t| t.name)
                .collect();
            if let Ok(c) = devvm_core::config::Config::load(&config)
                && let Some(t) = c.defaults.template
                && !names.contains(&t)
            {
                names.push(t);
            }
            let hosts = p.backends().placement.hosts().await?;
            if hosts.is_empty() {
                return Err(Error::invalid_input(
                    "the placement backend lists no hosts to sync templates to",
                ));
            }
            // Every template to every host; one that fails is reported and the rest go on.
            let mut failed = None;
            for name in &names {
                for host in &hosts {
                    match images
                        .prepare(name, host, &devvm_core::Progress::discard())
                        .await
                    {
                        Ok(t) if cli.json => println!(
                            "{}",
                            serde_json::json!({ "template": t.name, "host": host, "path": t.path, "digest": t.digest })
                        ),
                        Ok(t) => println!(
                            "{}  {}  {}  {}",
                            t.name,
                            host,
                            t.digest.as_deref().unwrap_or("-"),
                            t.path.display()
                        ),
                        Err(e) if cli.json => {
                            println!(
                                "{}",
                                serde_json::json!({ "template": name, "host": host, "error": e.info() })
                            );
                            failed = Some(e);
                        }
                        Err(e) => {
                            println!("{name}  {host}  FAILED: {e}");
                            failed = Some(e);
                        }
                    }
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
    }
    Ok(())
}

fn print_moves(moves: &[devvm_core::Move], dry_run: bool, json: bool) {
    for m in moves {
        if json {
            println!("{}", serde_json::json!({ "move": m, "done": !dry_run }));
        } else {
            let verb = if dry_run { "would move" } else { "moved" };
            println!("{verb} {} from {} to {}", m.vm, m.from, m.to);
        }
    }
    if moves.is_empty() && !json {
        println!("nothing to move");
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({ "error": e.info() }));
            }
            eprintln!("devvm: {e}");
            ExitCode::from(exit_code(e.kind()))
        }
    }
}

/// `db import`'s lease part: the SQLite lease database at `path` into the `[ip]`
/// PostgreSQL store. Returns how many leases it held and how many were added.
async fn import_leases(
    c: &devvm_core::config::Config,
    config: &std::path::Path,
    path: &std::path::Path,
) -> Result<(usize, usize), Error> {
    use devvm_core::backends::postgres::{PostgresIpAllocator, PostgresIpConfig};
    use devvm_core::backends::sqlite_ip::{SqliteIpAllocator, SqliteIpConfig};
    let ip = c.section(Step::Ip).map(|s| s.backend.as_str());
    if ip != Some("postgres") {
        return Err(Error::invalid_input(format!(
            "db import needs [ip] backend = \"postgres\" in {}, not {:?}",
            config.display(),
            ip.unwrap_or("none")
        )));
    }
    if !path.is_file() {
        return Err(Error::not_found(format!(
            "no SQLite lease database at {}",
            path.display()
        )));
    }
    let pg_config: PostgresIpConfig = c.options(Step::Ip)?;
    let pg = PostgresIpAllocator::from_config(&pg_config, c.base_dir())?;
    pg.migrate().await?;
    // The SQLite file must have been made for the same subnet plan.
    let lite = SqliteIpAllocator::from_config(
        &SqliteIpConfig {
            path: Some(path.to_owned()),
            subnet: pg_config.subnet,
            gateway: pg_config.gateway,
            reserved: pg_config.reserved.clone(),
        },
        std::path::Path::new("."),
        std::path::Path::new("."),
    )?;
    let leases = lite.leases().await?;
    let added = pg.import(&leases).await?;
    Ok((leases.len(), added))
}
