//! The steps of the pipeline (a module of its own: errors, events and types all name them).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The steps of a provisioning run, in pipeline order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Check the user in the directory.
    User,
    /// Reserve a slot on a host.
    Placement,
    /// Lease an IP address.
    Ip,
    /// Publish DNS A and PTR records.
    Dns,
    /// Make the local template available (sync from the registry if needed).
    Image,
    /// Create the VM's disk from the template.
    Disk,
    /// Define and start the domain.
    Domain,
    /// Bootstrap configuration management on the guest.
    Bootstrap,
}

impl Step {
    /// Every step, in pipeline order.
    pub const ALL: [Step; 8] = [
        Step::User,
        Step::Placement,
        Step::Ip,
        Step::Dns,
        Step::Image,
        Step::Disk,
        Step::Domain,
        Step::Bootstrap,
    ];

    /// The stable snake_case name used in events, the journal and config.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::User => "user",
            Step::Placement => "placement",
            Step::Ip => "ip",
            Step::Dns => "dns",
            Step::Image => "image",
            Step::Disk => "disk",
            Step::Domain => "domain",
            Step::Bootstrap => "bootstrap",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}
