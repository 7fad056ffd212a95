//! The connection's deadlines, as a table rather than sleeps: the core never
//! reads a clock.

use std::time::Instant;

/// The deadlines a connection keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// Send the next Ping.
    Ping = 0,
    /// The Pong for our Ping is overdue.
    PongTimeout = 1,
    /// The peer's Close is overdue.
    Close = 2,
}

const TIMERS: usize = 3;

/// One optional deadline per [`Timer`].
#[derive(Debug, Clone, Default)]
pub(crate) struct TimerTable {
    deadlines: [Option<Instant>; TIMERS],
}

impl TimerTable {
    pub(crate) fn set(&mut self, timer: Timer, at: Instant) {
        self.deadlines[timer as usize] = Some(at);
    }

    pub(crate) fn clear(&mut self, timer: Timer) {
        self.deadlines[timer as usize] = None;
    }

    pub(crate) fn clear_all(&mut self) {
        self.deadlines = [None; TIMERS];
    }

    pub(crate) fn is_set(&self, timer: Timer) -> bool {
        self.deadlines[timer as usize].is_some()
    }

    pub(crate) fn expired(&self, timer: Timer, now: Instant) -> bool {
        self.deadlines[timer as usize].is_some_and(|at| at <= now)
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }
}
