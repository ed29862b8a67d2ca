//! What a provisioner is configured with: request defaults, step time limits, retries.

use super::*;

/// What a request gets when it leaves a field unset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Defaults {
    /// Template when the request names none.
    pub template: Option<TemplateName>,
    /// Size when the request gives none.
    pub size: VmSize,
    /// Bootstrap settings when the request gives none.
    pub bootstrap: BootstrapSettings,
}

/// How long each step (and its undo) may take before it fails with
/// [`ErrorKind::Timeout`]. The undo of a step gets the same limit as the step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    per_step: [Duration; 8],
}

impl Default for Timeouts {
    fn default() -> Self {
        let mut t = Timeouts {
            per_step: [Duration::from_secs(60); 8],
        };
        t.set(Step::Image, Duration::from_secs(1800));
        t.set(Step::Disk, Duration::from_secs(1800));
        t.set(Step::Domain, Duration::from_secs(600));
        t.set(Step::Bootstrap, Duration::from_secs(1800));
        t
    }
}

impl Timeouts {
    /// The limit of `step`.
    pub fn get(&self, step: Step) -> Duration {
        self.per_step[step as usize]
    }
    /// Sets the limit of `step`.
    pub fn set(&mut self, step: Step, limit: Duration) {
        self.per_step[step as usize] = limit;
    }
}

/// How often a step's call is tried again after a transient failure
/// ([`Error::is_retryable`]: a service down or slow), with exponential backoff and jitter.
/// Retrying is safe because acting is idempotent per VM; the step's time limit bounds the
/// whole, and each retry is a progress event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retries {
    attempts: [u32; 8],
    /// The first pause.
    pub initial: Duration,
    /// The longest pause.
    pub max: Duration,
}

impl Default for Retries {
    /// Three attempts per step, pauses from 200 ms up to 3 s.
    fn default() -> Self {
        Retries {
            attempts: [3; 8],
            initial: Duration::from_millis(200),
            max: Duration::from_secs(3),
        }
    }
}

impl Retries {
    /// No retries at all: every call is tried once.
    pub fn none() -> Self {
        Retries {
            attempts: [1; 8],
            ..Retries::default()
        }
    }
    /// How many times `step`'s call is tried in all (at least 1).
    pub fn attempts(&self, step: Step) -> u32 {
        self.attempts[step as usize]
    }
    /// Sets how many times `step`'s call is tried in all (0 counts as 1).
    pub fn set_attempts(&mut self, step: Step, attempts: u32) {
        self.attempts[step as usize] = attempts.max(1);
    }
}
