//! Worker phases and the transitions allowed between them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Failed,
}

impl Phase {
    /// Whether the worker may move from `self` to `to`. Staying in the same phase is always allowed.
    pub fn can_become(self, to: Phase) -> bool {
        use Phase::*;
        self == to
            || matches!(
                (self, to),
                (Starting, Running | Paused | Stopping | Failed)
                    | (Running, Paused | Stopping | Failed)
                    | (Paused, Running | Stopping | Failed)
                    | (Stopping, Stopped | Failed)
                    | (Stopped, Starting)
                    | (Failed, Starting | Stopping | Stopped)
            )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "Starting",
            Phase::Running => "Running",
            Phase::Paused => "Paused",
            Phase::Stopping => "Stopping",
            Phase::Stopped => "Stopped",
            Phase::Failed => "Failed",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid phase transition {from} -> {to}")]
pub struct InvalidTransition {
    pub from: Phase,
    pub to: Phase,
}

/// Checks a transition; the worker's state cell uses this for every change.
pub fn transition(from: Phase, to: Phase) -> Result<Phase, InvalidTransition> {
    if from.can_become(to) {
        Ok(to)
    } else {
        Err(InvalidTransition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_and_refused_transitions() {
        use Phase::*;
        assert!(transition(Starting, Running).is_ok());
        assert!(transition(Running, Paused).is_ok());
        assert!(transition(Paused, Running).is_ok());
        assert!(transition(Running, Stopping).is_ok());
        assert!(transition(Stopping, Stopped).is_ok());
        assert!(transition(Failed, Starting).is_ok());
        assert_eq!(
            transition(Stopped, Running),
            Err(InvalidTransition {
                from: Stopped,
                to: Running
            })
        );
        assert!(transition(Running, Starting).is_err());
        assert!(transition(Stopped, Paused).is_err());
        assert!(transition(Stopping, Running).is_err());
    }
}
