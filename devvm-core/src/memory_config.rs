//! Config sections of the reference backends (`backend = "memory"`) and `none`, registered
//! in the backend registry like every other backend.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::error::Error;
use crate::memory::{
    HostCapacity, MemoryBootstrapper, MemoryDns, MemoryHypervisor, MemoryImages, MemoryIpAllocator,
    MemoryPlacement, MemoryUsers,
};
use crate::types::{TemplateName, User, UserName};
fn parse_range(s: &str) -> std::result::Result<(Ipv4Addr, Ipv4Addr), String> {
    let parse = |a: &str| {
        a.trim()
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))
    };
    match s.split_once('-') {
        Some((a, z)) => {
            let (a, z) = (parse(a)?, parse(z)?);
            if a > z {
                return Err("the range ends before it starts".into());
            }
            Ok((a, z))
        }
        None => {
            let a = parse(s)?;
            Ok((a, a))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFileOnly {
    state_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryAccount {
    name: UserName,
    display_name: Option<String>,
    mail: Option<String>,
    #[serde(default)]
    ssh_keys: Vec<String>,
    #[serde(default = "yes")]
    may_own_vms: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryUsersConfig {
    #[serde(default)]
    accounts: Vec<MemoryAccount>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryPlacementConfig {
    hosts: Vec<HostCapacity>,
    state_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryIpConfig {
    subnet: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    #[serde(default)]
    reserved: Vec<String>,
    state_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryDnsConfig {
    zone: String,
    state_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryImagesConfig {
    templates: Vec<TemplateName>,
    state_file: Option<PathBuf>,
}

/// Registers the reference backends under `memory` for every step, and `none` for the
/// bootstrap step.
pub(crate) fn register(r: &mut crate::registry::Registry) {
    use std::sync::Arc;
    r.register_users("memory", |ctx| {
        let o: MemoryUsersConfig = ctx.options()?;
        let mut users = MemoryUsers::new();
        for a in o.accounts {
            users = users.with_user(
                User {
                    name: a.name,
                    display_name: a.display_name,
                    mail: a.mail,
                    ssh_keys: a.ssh_keys,
                },
                a.may_own_vms,
            );
        }
        Ok(Arc::new(users))
    });
    r.register_placement("memory", |ctx| {
        let o: MemoryPlacementConfig = ctx.options()?;
        Ok(Arc::new(match o.state_file {
            Some(f) => MemoryPlacement::with_state_file(o.hosts, ctx.resolve_path(f)),
            None => MemoryPlacement::new(o.hosts),
        }))
    });
    r.register_ip("memory", |ctx| {
        let o: MemoryIpConfig = ctx.options()?;
        let mut ip = MemoryIpAllocator::new(o.subnet, o.gateway);
        for range in &o.reserved {
            let (a, z) = parse_range(range).map_err(|m| {
                Error::invalid_input(format!(
                    "config {}: [ip] reserved {range:?}: {m}",
                    ctx.config_path.display()
                ))
            })?;
            ip = ip.with_reserved(a, z);
        }
        if let Some(f) = o.state_file {
            ip = ip.with_state_file(ctx.resolve_path(f));
        }
        Ok(Arc::new(ip))
    });
    r.register_dns("memory", |ctx| {
        let o: MemoryDnsConfig = ctx.options()?;
        let mut dns = MemoryDns::new(o.zone);
        if let Some(f) = o.state_file {
            dns = dns.with_state_file(ctx.resolve_path(f));
        }
        Ok(Arc::new(dns))
    });
    r.register_images("memory", |ctx| {
        let o: MemoryImagesConfig = ctx.options()?;
        let mut images = MemoryImages::new(o.templates);
        if let Some(f) = o.state_file {
            images = images.with_state_file(ctx.resolve_path(f));
        }
        Ok(Arc::new(images))
    });
    r.register_hypervisor("memory", |ctx| {
        let o: StateFileOnly = ctx.options()?;
        let mut hv = MemoryHypervisor::new();
        if let Some(f) = o.state_file {
            hv = hv.with_state_file(ctx.resolve_path(f));
        }
        Ok(Arc::new(hv))
    });
    r.register_bootstrap("memory", |ctx| {
        let o: StateFileOnly = ctx.options()?;
        let mut bs = MemoryBootstrapper::new();
        if let Some(f) = o.state_file {
            bs = bs.with_state_file(ctx.resolve_path(f));
        }
        Ok(Arc::new(bs))
    });
    r.register_bootstrap("none", |ctx| {
        let _: Empty = ctx.options()?;
        Ok(Arc::new(crate::backends::NoopBootstrapper))
    });
}
