//! Given/when/then helpers for testing aggregates.

use crate::{Aggregate, DomainError};

/// Starts a test from a history of events.
pub fn given<A: Aggregate>(history: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let history: Vec<A::Event> = history.into_iter().collect();
    Given {
        state: A::fold(&history),
    }
}

/// A state built from a history.
#[derive(Debug)]
pub struct Given<A: Aggregate> {
    state: A,
}

impl<A: Aggregate> Given<A> {
    /// Decides `command` against the state.
    pub fn when(self, command: A::Command) -> When<A> {
        let outcome = self.state.decide(&command);
        When {
            state: self.state,
            command,
            outcome,
        }
    }
}

/// The outcome of a command.
#[derive(Debug)]
pub struct When<A: Aggregate> {
    state: A,
    command: A::Command,
    outcome: Result<Vec<A::Event>, DomainError>,
}

impl<A: Aggregate> When<A> {
    /// Asserts that the command produced exactly `expected`, and returns the new state.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = A::Event>) -> A {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.outcome {
            Ok(events) => {
                assert_eq!(events, expected, "events of {:?}", self.command);
                events.iter().fold(self.state, |s, e| s.evolve(e))
            }
            Err(e) => panic!(
                "{:?} was refused ({e}); expected {expected:?}",
                self.command
            ),
        }
    }

    /// Asserts that the command was refused with `expected`.
    #[track_caller]
    pub fn then_err(self, expected: DomainError) {
        assert_eq!(self.error(), expected);
    }

    /// Asserts that the command was refused, and returns the error.
    #[track_caller]
    pub fn error(self) -> DomainError {
        match self.outcome {
            Ok(events) => panic!("{:?} was accepted with {events:?}", self.command),
            Err(e) => e,
        }
    }
}
