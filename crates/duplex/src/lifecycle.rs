//! Graceful shutdown: every session watches one signal, and the server waits
//! for them on its way down.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Waker},
    time::{Duration, Instant},
};

use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFutureOwned},
    task::TaskTracker,
};

/// The sessions of one configuration, for graceful shutdown.
#[derive(Clone, Default)]
pub(crate) struct Lifecycle {
    token: CancellationToken,
    /// Set before the token is cancelled: a connection task reads it on
    /// every poll, and an atomic load is far cheaper than polling the
    /// token's future (which takes the token's lock, shared by every
    /// connection).
    started: Arc<AtomicBool>,
    /// When sessions still open are dropped: set, once, before `started`.
    deadline: Arc<OnceLock<Instant>>,
    tracker: TaskTracker,
}

/// How long after the shutdown's deadline the server still waits for the
/// tasks it has told to stop: they stop at their next poll, which their own
/// timer makes due at the deadline.
const STOP_SLACK: Duration = Duration::from_millis(500);

impl Lifecycle {
    /// What a connection task watches.
    pub(crate) fn signal(&self) -> ShutdownSignal {
        ShutdownSignal {
            started: Arc::clone(&self.started),
            deadline: Arc::clone(&self.deadline),
            wait: Box::pin(self.token.clone().cancelled_owned()),
            registered: None,
        }
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    pub(crate) fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(future);
    }

    pub(crate) fn live(&self) -> usize {
        self.tracker.len()
    }

    /// Closes every session with 1001 and waits for them; at `now +
    /// grace` (or the deadline of an earlier call) the sessions still open
    /// are dropped, handlers included.
    pub(crate) async fn shutdown(&self, grace: Duration) {
        let deadline = *self
            .deadline
            .get_or_init(|| tokio::time::Instant::now().into_std() + grace);
        self.started.store(true, Ordering::Release);
        self.token.cancel();
        self.tracker.close();
        let give_up = tokio::time::Instant::from_std(deadline + STOP_SLACK);
        if tokio::time::timeout_at(give_up, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.tracker.len(),
                "sessions still running after the shutdown grace period"
            );
        }
    }
}

tokio::task_local! {
    /// The configurations of the `App` serving the request being handled.
    pub(crate) static SERVED: ServedConfigs;
}

/// The configurations whose routes an `App` has served, in scope while it
/// handles a request: a WebSocket route notes its configuration there, so
/// that the App's shutdown reaches sessions of routes built with any
/// configuration (`App::route(path, duplex::web_socket(&other, ..))`).
#[derive(Clone, Default)]
pub(crate) struct ServedConfigs(Arc<Mutex<Vec<Lifecycle>>>);

impl ServedConfigs {
    /// Notes `lifecycle` once.
    pub(crate) fn note(&self, lifecycle: &Lifecycle) {
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if !seen
            .iter()
            .any(|l| Arc::ptr_eq(&l.started, &lifecycle.started))
        {
            seen.push(lifecycle.clone());
        }
    }

    /// Shuts every noted configuration down, with `also`, at once (one
    /// grace period for all).
    pub(crate) async fn shutdown(&self, also: &Lifecycle, grace: Duration) {
        self.note(also);
        let all = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut waits = tokio::task::JoinSet::new();
        for lifecycle in all {
            waits.spawn(async move { lifecycle.shutdown(grace).await });
        }
        while waits.join_next().await.is_some() {}
    }
}

/// One connection task's view of the shutdown.
pub(crate) struct ShutdownSignal {
    started: Arc<AtomicBool>,
    deadline: Arc<OnceLock<Instant>>,
    wait: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The waker the token's future last saw: the future is polled again
    /// only when the task's waker changes, since it keeps the old one.
    registered: Option<Waker>,
}

impl ShutdownSignal {
    /// A signal that never fires (a client connection).
    #[cfg(feature = "client")]
    pub(crate) fn never() -> Self {
        Lifecycle::default().signal()
    }

    /// When the session must be gone, once the shutdown has started.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline.get().copied()
    }

    /// Whether the shutdown has started; arranges a wake-up for when it does.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        if self.started.load(Ordering::Acquire) {
            return true;
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            // The flag is set before the token is cancelled, and the
            // cancellation wakes the waker registered here: nothing is missed.
            return false;
        }
        self.registered = Some(cx.waker().clone());
        self.wait.as_mut().poll(cx).is_ready()
    }
}
