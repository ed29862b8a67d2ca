//! The addresses of an IPv4 subnet that may be leased, shared by the lease stores
//! (SQLite and PostgreSQL).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::error::{BackendError, ErrorKind, Result};

/// A subnet plan that makes no sense.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SubnetError {
    #[error("gateway {gateway} is outside the subnet {subnet}")]
    GatewayOutside { gateway: Ipv4Addr, subnet: Ipv4Net },
    #[error("reserved range {first}-{last} ends before it starts")]
    BackwardsRange { first: Ipv4Addr, last: Ipv4Addr },
    #[error("reserved range {range:?}: {word:?} is not an IPv4 address")]
    NotIpv4 { range: String, word: String },
}

impl BackendError for SubnetError {
    const BACKEND: &'static str = "ip";

    fn kind(&self) -> ErrorKind {
        ErrorKind::InvalidInput
    }
}

/// The addresses of a subnet that may be leased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetPlan {
    subnet: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    reserved: Vec<(Ipv4Addr, Ipv4Addr)>,
}

impl SubnetPlan {
    /// A plan for `subnet` (its host bits are cleared). A gateway outside it is invalid.
    pub fn new(subnet: Ipv4Net, gateway: Option<Ipv4Addr>) -> Result<Self> {
        let subnet = subnet.trunc();
        if let Some(gw) = gateway
            && !subnet.contains(&gw)
        {
            return Err(SubnetError::GatewayOutside {
                gateway: gw,
                subnet,
            }
            .into());
        }
        Ok(SubnetPlan {
            subnet,
            gateway,
            reserved: Vec::new(),
        })
    }

    /// Never hands out `first..=last`.
    pub fn reserve(mut self, first: Ipv4Addr, last: Ipv4Addr) -> Result<Self> {
        if first > last {
            return Err(SubnetError::BackwardsRange { first, last }.into());
        }
        self.reserved.push((first, last));
        Ok(self)
    }

    /// Parses `"a-b"` or `"a"` and reserves it.
    pub fn reserve_str(self, range: &str) -> Result<Self> {
        let parse = |s: &str| {
            s.trim()
                .parse::<Ipv4Addr>()
                .map_err(|_| SubnetError::NotIpv4 {
                    range: range.to_owned(),
                    word: s.to_owned(),
                })
        };
        let (a, z) = match range.split_once('-') {
            Some((a, z)) => (parse(a)?, parse(z)?),
            None => {
                let a = parse(range)?;
                (a, a)
            }
        };
        self.reserve(a, z)
    }

    /// The subnet.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The gateway, if any.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.gateway
    }

    /// The first and last address that could ever be leased (before reservations).
    pub(crate) fn bounds(&self) -> (u32, u32) {
        let (net, bcast) = (
            u32::from(self.subnet.network()),
            u32::from(self.subnet.broadcast()),
        );
        if self.subnet.prefix_len() >= 31 {
            (net, bcast)
        } else {
            (net + 1, bcast - 1)
        }
    }

    /// Whether `ip` may be leased at all.
    pub fn leasable(&self, ip: Ipv4Addr) -> bool {
        let (lo, hi) = self.bounds();
        let n = u32::from(ip);
        n >= lo
            && n <= hi
            && Some(ip) != self.gateway
            && !self.reserved.iter().any(|(a, b)| *a <= ip && ip <= *b)
    }

    /// A stable text form, stored in the database so that a file made for one subnet is
    /// never used for another.
    pub(crate) fn fingerprint(&self) -> String {
        let mut reserved = self.reserved.clone();
        reserved.sort();
        let r: Vec<String> = reserved.iter().map(|(a, b)| format!("{a}-{b}")).collect();
        format!(
            "{} gw={} reserved=[{}]",
            self.subnet,
            self.gateway.map(|g| g.to_string()).unwrap_or_default(),
            r.join(",")
        )
    }

    /// Address ranges that are never leasable inside the bounds, as inclusive u32 pairs.
    pub(crate) fn blocked(&self) -> Vec<(u32, u32)> {
        let (lo, hi) = self.bounds();
        let mut v: Vec<(u32, u32)> = self
            .reserved
            .iter()
            .map(|(a, b)| (u32::from(*a).max(lo), u32::from(*b).min(hi)))
            .filter(|(a, b)| a <= b)
            .collect();
        if let Some(g) = self.gateway {
            v.push((u32::from(g), u32::from(g)));
        }
        v
    }
}
